"""Loading and checking :class:`~samv2_components.networks.SAMv2Net` weights.

A bundle's ``models/model.pt`` is a plain state dict of :class:`SAMv2Net` (146 tensors for the three-head
network, 138 for SAM v1's two heads, at any ``width``). :func:`load_weights` reads it and refuses, with one
line that names the file and the offending tensors, a checkpoint that does not fit the network built from the
bundle's ``network_def``; where the checkpoint's own shapes reveal another ``width`` or head set it says which
``network_def`` overrides would make it fit. Upstream (mmcv) checkpoints must be converted first with
``scripts/convert_upstream.py`` (see :mod:`samv2_components.networks.upstream`).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from samv2_components.errors import CheckpointError
from samv2_components.networks.samv2_net import _FPN_CHANNELS, _STAGE_CHANNELS, HEAD_NAMES

__all__ = [
    "check_state_dict", "load_weights", "infer_network_kwargs", "read_state_dict", "format_network_kwargs",
    "network_def_overrides",
]

logger = logging.getLogger("samv2_components")

#: at most this many key names are listed per category in an error message
MAX_LISTED_KEYS = 10


def _shape_text(shape: tuple | None) -> str:
    if shape is None:
        return "not a tensor"
    return "(" + ",".join(str(int(s)) for s in shape) + ")"


def _shape_of(value: Any) -> tuple | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _list_keys(keys: list[str]) -> str:
    listed = ", ".join(keys[:MAX_LISTED_KEYS])
    if len(keys) > MAX_LISTED_KEYS:
        listed += f" (+{len(keys) - MAX_LISTED_KEYS} more)"
    return listed


def _width_text(width: float) -> str:
    return repr(float(width))


def _heads_text(heads) -> str:
    return "(" + ", ".join(heads) + ")"


def format_network_kwargs(kwargs: Mapping[str, Any]) -> str:
    """``width=1.0, heads=(fine, coarse)`` (plus ``embedding_dim``/``in_channels`` when not the defaults)."""
    parts = []
    if "width" in kwargs:
        parts.append(f"width={_width_text(kwargs['width'])}")
    if "heads" in kwargs:
        parts.append(f"heads={_heads_text(kwargs['heads'])}")
    if kwargs.get("embedding_dim", 128) != 128:
        parts.append(f"embedding_dim={kwargs['embedding_dim']}")
    if kwargs.get("in_channels", 1) != 1:
        parts.append(f"in_channels={kwargs['in_channels']}")
    return ", ".join(parts)


def network_def_overrides(kwargs: dict) -> str:
    """The ``monai.bundle run`` command-line overrides that build the network these weights fit."""
    parts = [f"--network_def#width {float(kwargs['width'])!r}"]
    heads = ",".join(f"'{h}'" for h in kwargs["heads"])
    parts.append(f'--network_def#heads "[{heads}]"')
    if kwargs.get("embedding_dim", 128) != 128:
        parts.append(f"--network_def#embedding_dim {kwargs['embedding_dim']}")
    if kwargs.get("in_channels", 1) != 1:
        parts.append(f"--network_def#in_channels {kwargs['in_channels']}")
    return " ".join(parts)


def _network_kwargs(network: nn.Module) -> dict[str, Any] | None:
    """The constructor arguments of a :class:`SAMv2Net` (``None`` for another kind of module)."""
    if not hasattr(network, "head_names") or not hasattr(network, "width"):
        return None
    kwargs: dict[str, Any] = {"width": float(network.width), "heads": tuple(network.head_names)}
    if hasattr(network, "embedding_dim"):
        kwargs["embedding_dim"] = int(network.embedding_dim)
    stem = getattr(getattr(getattr(network, "encoder", None), "stem", None), "conv", None)
    if isinstance(stem, nn.Conv3d):
        kwargs["in_channels"] = int(stem.in_channels)
    return kwargs


def _channels_for(width: float) -> tuple[list[int], int]:
    """Encoder stage channels and FPN channels that ``SAMv2Net(width=width)`` builds."""
    return [max(1, round(c * width)) for c in _STAGE_CHANNELS], max(1, round(_FPN_CHANNELS * width))


def infer_network_kwargs(state_dict: Mapping[str, Any], source: str | os.PathLike = "state dict") -> dict[str, Any]:
    """The :class:`SAMv2Net` arguments a state dict in *our* naming was made with.

    Returns ``dict(width=..., heads=(...), embedding_dim=...)``; ``in_channels`` is added when the stem does not
    take one channel. ``width`` is the stem's channels / 64 (checked against the other stages, so that widths whose
    channel counts were rounded are recovered), ``heads`` the ``heads.<name>.`` prefixes present (canonical order),
    ``embedding_dim`` the output channels of a head's output conv.

    Raises:
        CheckpointError: the state dict has no stem convolution or no head (not a SAMv2Net state dict).
    """
    stem = state_dict.get("encoder.stem.conv.weight")
    if not isinstance(stem, torch.Tensor) or stem.ndim != 5:
        raise CheckpointError(source, "is not a SAMv2Net state dict: no 5-D tensor 'encoder.stem.conv.weight'")
    heads = tuple(h for h in HEAD_NAMES if any(k.startswith(f"heads.{h}.") for k in state_dict))
    if not heads:
        raise CheckpointError(source, "is not a SAMv2Net state dict: no 'heads.<name>.*' tensors")

    # width: the first candidate that reproduces every channel count present
    observed_stages: dict[int, int] = {}
    for i in range(len(_STAGE_CHANNELS)):
        w = state_dict.get(f"encoder.stages.{i}.0.conv1.conv.weight")
        if isinstance(w, torch.Tensor) and w.ndim == 5:
            observed_stages[i] = int(w.shape[0])
    observed_fpn = None
    for h in heads:
        w = state_dict.get(f"heads.{h}.lateral_convs.0.weight")
        if isinstance(w, torch.Tensor) and w.ndim == 5:
            observed_fpn = int(w.shape[0])
            break
    stem_channels = int(stem.shape[0])
    candidates = [stem_channels / _STAGE_CHANNELS[0]]
    candidates += [c / _STAGE_CHANNELS[i] for i, c in observed_stages.items()]
    if observed_fpn is not None:
        candidates.append(observed_fpn / _FPN_CHANNELS)
    width = candidates[0]
    for candidate in candidates:
        stages, fpn = _channels_for(candidate)
        if stages[0] == stem_channels and all(stages[i] == c for i, c in observed_stages.items()) and (
            observed_fpn is None or fpn == observed_fpn
        ):
            width = candidate
            break

    embedding_dim = None
    for h in heads:
        w = state_dict.get(f"heads.{h}.output_conv.weight")
        if isinstance(w, torch.Tensor) and w.ndim == 5:
            embedding_dim = int(w.shape[0])
            break
    kwargs: dict[str, Any] = {"width": float(width), "heads": heads, "embedding_dim": embedding_dim or 128}
    if int(stem.shape[1]) != 1:
        kwargs["in_channels"] = int(stem.shape[1])
    return kwargs


def _looks_upstream(keys) -> bool:
    return any(k.startswith(("backbone.", "neck.", "read_out_head.", "semantic_head.")) for k in keys)


def _hint(network: nn.Module, state_dict: Mapping[str, Any]) -> str | None:
    """Which ``network_def`` overrides would make ``state_dict`` fit (None if unknown or none would)."""
    if _looks_upstream(state_dict.keys()):
        return (
            "this looks like an upstream (mmcv) SAM/SAMv2 checkpoint: convert it first with "
            "scripts/convert_upstream.py"
        )
    ours = _network_kwargs(network)
    if ours is None:
        return None
    try:
        theirs = infer_network_kwargs(state_dict)
    except CheckpointError:
        return None
    theirs.setdefault("in_channels", 1)
    differing = []
    if not math.isclose(theirs["width"], ours["width"], rel_tol=1e-6):
        differing.append("width")
    if tuple(theirs["heads"]) != tuple(ours["heads"]):
        differing.append("heads")
    for name in ("embedding_dim", "in_channels"):
        if name in ours and theirs[name] != ours[name]:
            differing.append(name)
    if not differing:
        return None
    return f"the checkpoint looks like {format_network_kwargs(theirs)}: set " + " / ".join(
        f"network_def#{name}" for name in differing
    )


def check_state_dict(
    network: nn.Module,
    state_dict: Mapping[str, Any],
    source: str | os.PathLike,
    *,
    key_name: Callable[[str], str] | None = None,
) -> None:
    """Check that ``state_dict`` has exactly ``network``'s keys with the same shapes.

    Args:
        network: the module the weights are for (usually a :class:`SAMv2Net`).
        state_dict: tensors by name.
        source: the file (or description) the tensors came from; the error message starts with it.
        key_name: how to show a key of ``network`` in the message (for example its upstream name); keys only
            in ``state_dict`` are shown as they are.

    Raises:
        CheckpointError: one line, ``"<source>: does not fit the network (width=..., heads=...): missing keys:
            ...; unexpected keys: ...; wrong shapes: key (checkpoint (..) vs network (..)), ..."`` with up to
            :data:`MAX_LISTED_KEYS` names per category, followed by a hint when the checkpoint evidently is for
            another ``width``/head set or is an unconverted upstream checkpoint.
    """
    expected = network.state_dict()
    show = key_name or (lambda k: k)
    missing = [show(k) for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = []
    for k, ref in expected.items():
        if k in state_dict:
            got = _shape_of(state_dict[k])
            if got != tuple(ref.shape):
                wrong.append(
                    f"{show(k)} (checkpoint {_shape_text(got)} vs network {_shape_text(tuple(ref.shape))})"
                )
    if not (missing or unexpected or wrong):
        return
    ours = _network_kwargs(network)
    what = f"the network ({format_network_kwargs(ours)})" if ours else f"the network ({type(network).__name__})"
    problems = []
    if missing:
        problems.append(f"missing keys: {_list_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list_keys(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_list_keys(wrong)}")
    message = f"does not fit {what}: " + "; ".join(problems)
    hint = _hint(network, state_dict) if key_name is None else None
    if hint:
        message += f"; {hint}"
    raise CheckpointError(source, message)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split())  # no ANSI colours, one line
    text = text if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> Mapping[str, Any]:
    """Drop a ``module.`` prefix that every key carries (a checkpoint of a DataParallel/DDP-wrapped network)."""
    if state_dict and all(isinstance(k, str) and k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def read_state_dict(path: str | os.PathLike) -> Mapping[str, Any]:
    """Read a bundle checkpoint safely (``weights_only=True``) and return its state dict.

    Accepts a plain state dict or one wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``; a ``module.``
    prefix on every key (DataParallel) is removed.

    Raises:
        CheckpointError: the file is missing, cannot be unpickled safely, or holds no state dict.
    """
    if not os.path.isfile(path):
        raise CheckpointError(path, "file not found" if not os.path.exists(path) else "is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        problem = "cannot be read as a PyTorch checkpoint: "
        if "weights only" in str(exc).lower():
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            problem += (
                "it holds Python objects besides tensors"
                + (f" ({found[1]})" if found else "")
                + ", which are not loaded for safety (an upstream mmcv checkpoint? convert it with "
                "scripts/convert_upstream.py)"
            )
        else:
            problem += _one_line(exc)
        raise CheckpointError(path, problem) from exc
    except Exception as exc:  # zip/EOF/OS errors of a truncated or foreign file
        raise CheckpointError(path, f"cannot be read as a PyTorch checkpoint: {_one_line(exc)}") from exc
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            path, f"is not a state dict (a mapping of tensor names to tensors) but {type(obj).__name__}"
        )
    return _strip_prefix(obj)


def load_weights(network: nn.Module, path: str | os.PathLike, *, missing_ok: bool = False) -> bool:
    """Load a bundle's ``model.pt`` into ``network`` after checking that every tensor fits.

    Args:
        network: the network built from the bundle's ``network_def``.
        path: the checkpoint (a plain state dict, or ``{"state_dict": ...}`` / ``{"model": ...}``).
        missing_ok: when the file does not exist, log a warning (logger ``samv2_components``) that the
            network runs with random weights and return ``False`` instead of raising.

    Returns:
        ``True`` when the weights were loaded, ``False`` when the file is missing and ``missing_ok``.

    Raises:
        CheckpointError: the file is missing (unless ``missing_ok``), unreadable, or does not fit the network.
    """
    if not os.path.exists(path) and missing_ok:
        message = (
            f"no trained weights at {os.fspath(path)}: the network runs with RANDOM weights, "
            "embeddings are not meaningful"
        )
        logger.warning(message)
        return False
    state_dict = read_state_dict(path)
    check_state_dict(network, state_dict, path)
    network.load_state_dict(state_dict, strict=True)
    logger.info("loaded weights from %s", os.fspath(path))
    return True
