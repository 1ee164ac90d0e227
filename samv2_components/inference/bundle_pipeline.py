"""A bundle's embedding pipeline outside the bundle workflow: its config parsed, preprocessing, network with weights
and inferer built, scans embedded. The one place that does this for the scripts, the benchmarks and CrossSAM's
training rounds (so they all measure what the bundle runs).

* :func:`read_bundle_config` parses config files of a bundle (``bundle_root`` set, overrides applied);
* :func:`section_settings` gives a section's arguments as written (without ``_target_``);
* :class:`BundlePipeline` builds ``preprocessing``, the network (``network_def`` + weights) and the inferer from a
  bundle's ``configs/inference.json`` and embeds scans: ``{head: MetaTensor (C, d, h, w)}`` per scan, each head
  carrying the affine of its own grid (voxel index -> world, as the preprocessed image's, RAS as MONAI reads it;
  the matching code converts to world **LPS mm**).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["BundlePipeline", "read_bundle_config", "section_settings"]


def read_bundle_config(
    bundle_root: str | os.PathLike,
    configs: str | os.PathLike | Sequence[str | os.PathLike] = "inference.json",
    overrides: Mapping[str, Any] | None = None,
):
    """A ``monai.bundle.ConfigParser`` holding a bundle's config files, merged in order.

    Args:
        bundle_root: the bundle folder (the one holding ``configs/``); set as the config's ``bundle_root``.
        configs: config file name(s): relative ones are looked up in ``<bundle_root>/configs``, absolute paths are
            used as they are.
        overrides: config keys to set after reading (``"network_def#width"`` style ids), in order.
    """
    from monai.bundle import ConfigParser

    names = [configs] if isinstance(configs, (str, os.PathLike)) else list(configs)
    files = [os.path.join(os.fspath(bundle_root), "configs", os.fspath(name)) for name in names]
    parser = ConfigParser()
    parser.read_config(files[0] if len(files) == 1 else files)
    parser["bundle_root"] = os.fspath(bundle_root)
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def section_settings(parser, key: str, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """The arguments of config section ``key`` as written in the config (not parsed), without ``_target_`` and
    the keys in ``exclude``."""
    return {k: v for k, v in parser[key].items() if k != "_target_" and k not in exclude}


class BundlePipeline:
    """A bundle's preprocessing, network (with weights) and inferer, parsed from its ``configs/inference.json``.

    Args:
        bundle_root: the bundle folder.
        ckpt: the weights (a ``model.pt`` or a training checkpoint); default: the config's ``ckpt_path``. With a
            given ``network``, weights are loaded only when ``ckpt`` is given.
        device: torch device of the network and the embeddings.
        overrides: config keys to set before anything is parsed (e.g. ``{"network_def#width": 0.5}``).
        network: use this network instead of the config's ``network_def`` (e.g. one built from a training
            config, or a random one).
        config_file: the config file(s) to read (see :func:`read_bundle_config`).
        inferer_key: the config section of the inferer; default ``embedding_inferer`` when the config has one (the
            uncached inferer of the matching bundle), else ``inferer``.
        drop_preprocessing: names of ``preprocessing`` transforms to leave out (matched against their
            ``_target_``), e.g. ``("DivisiblePadd",)``: the inferer pads internally.

    Attributes:
        parser: the ``ConfigParser`` (other sections: :meth:`parsed`, :meth:`settings`).
        preprocessing, inferer, network, ckpt, device.
    """

    def __init__(
        self,
        bundle_root: str | os.PathLike,
        ckpt: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        overrides: Mapping[str, Any] | None = None,
        network: torch.nn.Module | None = None,
        config_file: str | Sequence[str] = "inference.json",
        inferer_key: str | None = None,
        drop_preprocessing: Sequence[str] = (),
    ):
        from samv2_components.networks.weights import load_weights

        self.bundle_root = os.fspath(bundle_root)
        self.parser = parser = read_bundle_config(self.bundle_root, config_file, overrides)
        if drop_preprocessing:
            transforms = parser["preprocessing"]["transforms"]
            parser["preprocessing"]["transforms"] = [
                t for t in transforms if not any(name in str(t.get("_target_")) for name in drop_preprocessing)
            ]
        self.device = torch.device(device)
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer_key = inferer_key or ("embedding_inferer" if "embedding_inferer" in parser else "inferer")
        self.inferer = parser.get_parsed_content(self.inferer_key)
        if network is None:
            self.network = parser.get_parsed_content("network_def").to(self.device).eval()
            self.ckpt = os.fspath(ckpt) if ckpt else parser.get_parsed_content("ckpt_path")
        else:
            self.network, self.ckpt = network, os.fspath(ckpt) if ckpt else None
        if self.ckpt:
            load_weights(self.network, self.ckpt)
        self.network = self.network.to(self.device).eval()

    def parsed(self, key: str) -> Any:
        """Config section ``key`` parsed and instantiated (the parser caches it: the same object every call), e.g.
        the matching bundle's ``refiner`` or the registration bundle's ``adareg``."""
        return self.parser.get_parsed_content(key)

    def settings(self, key: str, exclude: Sequence[str] = ()) -> dict[str, Any]:
        """Config section ``key``'s arguments as written (:func:`section_settings`), e.g. the matcher's."""
        return section_settings(self.parser, key, exclude)

    def preprocess(self, path: str, modality: str = "ct"):
        """The scan at ``path`` through the bundle preprocessing: ``MetaTensor (1, D, H, W)``."""
        return self.preprocessing({"image": path, "modality": modality})["image"]

    def embed_image(self, image) -> dict:
        """``{head: MetaTensor (C, d, h, w)}`` of a preprocessed image ``(1, D, H, W)`` (no gradients)."""
        with torch.no_grad():
            heads = self.inferer(image[None].to(self.device), self.network)
        return {k: v[0] for k, v in heads.items()}

    def embed(self, path: str, modality: str = "ct") -> dict:
        """``{head: MetaTensor (C, d, h, w)}`` of the scan at ``path`` through the bundle preprocessing and
        inferer."""
        return self.embed_image(self.preprocess(path, modality))
