"""An on-disk cache of embeddings, so that a scan used in many runs (a template, a follow-up series) is embedded
once. Opt-in: the bundles pass ``cache_dir: null`` by default.

An entry's key is the SHA-256 of everything that determines the embedding: the preprocessed input tensor
(hence the file's content *and* the preprocessing: orientation, spacing, intensity normalisation, padding), its
affine, the network's weights and architecture, and the inferer's numerics (bf16 or fp32). Any change to one of
them is a different key, so a stale entry is never returned; entries are never overwritten, only added.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from samv2_components.io.atomic import atomic_file

__all__ = ["CachedEmbeddingInferer", "network_fingerprint"]


def network_fingerprint(network: torch.nn.Module) -> str:
    """SHA-256 of a network's class, parameter/buffer names, shapes, dtypes and values (hex)."""
    digest = hashlib.sha256(type(network).__qualname__.encode())
    for name, tensor in network.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class CachedEmbeddingInferer(Inferer):
    """Wrap an embedding inferer (:class:`~samv2_components.inference.SAMv2Inferer`) with an on-disk cache.

    Args:
        inferer: the wrapped inferer; ``inferer(inputs, network) -> {head: MetaTensor}``.
        cache_dir: folder of the cache entries (created on first write); ``None`` disables caching.

    Only single-scan batches (``B == 1``) are cached; larger batches pass through. An entry is one ``.pt`` file of
    the maps as the inferer returns them plus their affines (with the bundles' float16 maps about 3 x 128 x 2 bytes
    per fine voxel).
    """

    def __init__(self, inferer: Inferer, cache_dir: str | os.PathLike | None = None):
        super().__init__()
        self.inferer = inferer
        self.cache_dir = None if cache_dir in (None, "") else Path(cache_dir)
        self.hits = self.misses = 0

    def key(self, inputs: torch.Tensor, network: torch.nn.Module) -> str:
        """The cache key (hex SHA-256) of embedding ``inputs`` ``(1, 1, D, H, W)`` with ``network``.

        The weights are hashed on every call (:func:`network_fingerprint`, about 9 ms for the light network of
        2.3 M parameters on one CPU core): weights changed in place are a new key, and another network object
        with the same weights is the same key.
        """
        digest = hashlib.sha256(network_fingerprint(network).encode())
        # the inferer's public settings (output_dtype is a torch.dtype); its private state (the prepared network
        # copy) is no setting
        settings = {k: str(v) if isinstance(v, torch.dtype) else v for k, v in vars(self.inferer).items()
                    if not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple, torch.dtype))}
        digest.update(repr(sorted(settings.items())).encode())
        data = (inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs).detach().float().cpu().contiguous()
        digest.update(repr(tuple(data.shape)).encode())
        digest.update(data.numpy().tobytes())
        if isinstance(inputs, MetaTensor):  # a batch's meta holds lists: hash the affine and space as given
            digest.update(np.ascontiguousarray(np.asarray(inputs.affine), dtype=np.float64).tobytes())
            digest.update(repr(inputs.meta.get("space", "RAS")).encode())
        return digest.hexdigest()

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> dict[str, torch.Tensor]:
        if self.cache_dir is None or inputs.shape[0] != 1:
            return self.inferer(inputs, network, *args, **kwargs)
        path = self.cache_dir / f"{self.key(inputs, network)}.pt"
        try:
            entry = torch.load(path, map_location=inputs.device, weights_only=False)
        except FileNotFoundError:  # not cached, or removed (a cache being cleared) since: embed it
            entry = None
        if entry is not None:
            self.hits += 1
            if isinstance(inputs, MetaTensor):  # same content, maybe another file: name it after this input
                for e in entry.values():
                    e["meta"]["filename_or_obj"] = inputs.meta.get("filename_or_obj", "")
            heads = {}
            for name, e in entry.items():
                heads[name] = MetaTensor(e["array"], affine=torch.as_tensor(e["affine"]), meta=e["meta"])
                heads[name].is_batch = e["is_batch"]  # batched meta (lists) must decollate like the inferer's
            return heads
        self.misses += 1
        heads = self.inferer(inputs, network, *args, **kwargs)
        entry = {
            name: {
                "array": h.as_tensor().detach().cpu() if isinstance(h, MetaTensor) else h.detach().cpu(),
                "affine": np.asarray(h.affine) if isinstance(h, MetaTensor) else None,
                "meta": {k: v for k, v in getattr(h, "meta", {}).items() if k in ("space", "filename_or_obj")},
                "is_batch": bool(getattr(h, "is_batch", False)),
            }
            for name, h in heads.items()
        }
        with atomic_file(path) as tmp:
            torch.save(entry, tmp)
        return heads
