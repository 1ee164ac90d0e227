"""Conversion of the upstream SAM / SAMv2 (mmcv) checkpoints to :class:`SAMv2Net` state dicts.

The upstream reference implementation (``alibaba-damo-academy/self-supervised-anatomical-embedding-v2``, MIT)
saves mmcv checkpoints ``{'meta': {...}, 'state_dict': {...}}`` whose tensor names follow mmcv's ``ConvModule``
(``X.conv.weight``, ``X.bn.*``) and mmaction's ``ResNet3d``:

=====================================================  ============================================
upstream                                               :class:`SAMv2Net`
=====================================================  ============================================
``backbone.conv1.conv.*`` / ``backbone.conv1.bn.*``    ``encoder.stem.conv.*`` / ``encoder.stem.norm.*``
``backbone.layer{n}.{b}.conv{k}.conv.*`` / ``.bn.*``   ``encoder.stages.{n-1}.{b}.conv{k}.conv.*`` / ``.norm.*``
``backbone.layer{n}.0.downsample.conv.*`` / ``.bn.*``  ``encoder.stages.{n-1}.0.shortcut.conv.*`` / ``.norm.*``
``neck.lateral_convs.{i}.conv.*``                      ``heads.fine.lateral_convs.{i}.*``
``neck.fpn_convs.0.conv.*``                            ``heads.fine.output_conv.*``
``read_out_head.lateral_convs.0.conv.*``               ``heads.coarse.lateral_convs.0.*``
``read_out_head.fpn_convs.0.conv.*``                   ``heads.coarse.output_conv.*``
``semantic_head.*`` (SAMv2 only)                       ``heads.semantic.*`` (like ``neck``)
=====================================================  ============================================

SAMv2 checkpoints hold 146 tensors, SAM v1 ones 138 (no ``semantic_head``). The tensors are copied unchanged:
the two networks compute the same function (``tests/test_upstream_conversion.py`` checks this against an
independent functional implementation of the upstream architecture).

The published weights live on ModelScope (``viggin/Self-supervised_Anatomical_Embeddings``); download them
where that site is reachable and convert them with ``scripts/convert_upstream.py``.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import types
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from samv2_components.errors import CheckpointError
from samv2_components.io.atomic import atomic_file
from samv2_components.networks.samv2_net import HEAD_NAMES, SAMv2Net
from samv2_components.networks.weights import (
    _list_keys,
    _one_line,
    _strip_prefix,
    check_state_dict,
    format_network_kwargs,
)

__all__ = [
    "UPSTREAM_KEY_RULES",
    "upstream_to_samv2_key",
    "samv2_to_upstream_key",
    "convert_upstream_state_dict",
    "load_upstream_checkpoint",
    "convert_upstream_checkpoint",
]

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_CONV = r"(weight|bias)"


def _build_rules() -> list[tuple[str, str]]:
    rules = [
        (rf"backbone\.conv1\.conv\.{_CONV}", r"encoder.stem.conv.\1"),
        (rf"backbone\.conv1\.bn\.{_BN}", r"encoder.stem.norm.\1"),
    ]
    for n in range(1, 5):
        rules += [
            (rf"backbone\.layer{n}\.(\d+)\.(conv[12])\.conv\.{_CONV}", rf"encoder.stages.{n - 1}.\1.\2.conv.\3"),
            (rf"backbone\.layer{n}\.(\d+)\.(conv[12])\.bn\.{_BN}", rf"encoder.stages.{n - 1}.\1.\2.norm.\3"),
            (rf"backbone\.layer{n}\.(\d+)\.downsample\.conv\.{_CONV}", rf"encoder.stages.{n - 1}.\1.shortcut.conv.\2"),
            (rf"backbone\.layer{n}\.(\d+)\.downsample\.bn\.{_BN}", rf"encoder.stages.{n - 1}.\1.shortcut.norm.\2"),
        ]
    for upstream, ours in (("neck", "fine"), ("read_out_head", "coarse"), ("semantic_head", "semantic")):
        rules += [
            (rf"{upstream}\.lateral_convs\.(\d+)\.conv\.{_CONV}", rf"heads.{ours}.lateral_convs.\1.\2"),
            (rf"{upstream}\.fpn_convs\.0\.conv\.{_CONV}", rf"heads.{ours}.output_conv.\1"),
        ]
    return rules


#: ordered ``(regex, replacement)`` pairs: the first regex that matches an upstream key in full gives our key
#: (``re.Match.expand(replacement)``).
UPSTREAM_KEY_RULES: list[tuple[str, str]] = _build_rules()
_COMPILED_RULES = [(re.compile(pattern), replacement) for pattern, replacement in UPSTREAM_KEY_RULES]

# the reverse direction, only used to name missing tensors by their upstream names in error messages
_REVERSE_RULES = [
    (re.compile(r"encoder\.stem\.conv\.(\w+)"), lambda m: f"backbone.conv1.conv.{m[1]}"),
    (re.compile(r"encoder\.stem\.norm\.(\w+)"), lambda m: f"backbone.conv1.bn.{m[1]}"),
    (
        re.compile(r"encoder\.stages\.(\d)\.(\d+)\.(conv[12])\.(conv|norm)\.(\w+)"),
        lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.{m[3]}.{'bn' if m[4] == 'norm' else 'conv'}.{m[5]}",
    ),
    (
        re.compile(r"encoder\.stages\.(\d)\.(\d+)\.shortcut\.(conv|norm)\.(\w+)"),
        lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.downsample.{'bn' if m[3] == 'norm' else 'conv'}.{m[4]}",
    ),
    (
        re.compile(r"heads\.(fine|coarse|semantic)\.lateral_convs\.(\d+)\.(\w+)"),
        lambda m: f"{_UPSTREAM_HEAD[m[1]]}.lateral_convs.{m[2]}.conv.{m[3]}",
    ),
    (
        re.compile(r"heads\.(fine|coarse|semantic)\.output_conv\.(\w+)"),
        lambda m: f"{_UPSTREAM_HEAD[m[1]]}.fpn_convs.0.conv.{m[2]}",
    ),
]
_UPSTREAM_HEAD = {"fine": "neck", "coarse": "read_out_head", "semantic": "semantic_head"}


def upstream_to_samv2_key(key: str) -> str | None:
    """Our name for an upstream tensor name, or ``None`` when no rule of :data:`UPSTREAM_KEY_RULES` maps it."""
    for pattern, replacement in _COMPILED_RULES:
        match = pattern.fullmatch(key)
        if match:
            return match.expand(replacement)
    return None


def samv2_to_upstream_key(key: str) -> str:
    """The upstream name of one of our tensor names (the key itself if it has none); for messages."""
    for pattern, build in _REVERSE_RULES:
        match = pattern.fullmatch(key)
        if match:
            return build(match)
    return key


def _infer_upstream_kwargs(upstream: Mapping[str, Any], source: str) -> dict[str, Any]:
    def shape(key: str) -> tuple:
        value = upstream.get(key)
        if not isinstance(value, torch.Tensor) or value.ndim != 5:
            raise CheckpointError(source, f"is not a SAM/SAMv2 checkpoint: no 5-D tensor '{key}'")
        return tuple(value.shape)

    stem = shape("backbone.conv1.conv.weight")
    has_semantic = any(k.startswith("semantic_head.") for k in upstream)
    heads = ("fine", "coarse", "semantic") if has_semantic else ("fine", "coarse")
    kwargs: dict[str, Any] = {
        "width": stem[0] / 64,
        "heads": heads,
        "embedding_dim": shape("neck.fpn_convs.0.conv.weight")[0],
    }
    if stem[1] != 1:
        kwargs["in_channels"] = stem[1]
    return kwargs


def convert_upstream_state_dict(
    upstream: Mapping[str, torch.Tensor], source: str | os.PathLike = "upstream checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Rename an upstream SAM/SAMv2 state dict to :class:`SAMv2Net` names and check it fits.

    Args:
        upstream: the upstream tensors by upstream name (``checkpoint['state_dict']``); a ``module.`` prefix on
            every key is removed.
        source: shown first in error messages (usually the checkpoint file).

    Returns:
        ``(state_dict, network_kwargs)``: our state dict and the :class:`SAMv2Net` arguments it fits,
        ``width`` = stem channels / 64, ``heads`` = ``(fine, coarse, semantic)`` when ``semantic_head.*`` tensors
        are present else ``(fine, coarse)``, ``embedding_dim`` = the fine head's output channels (and
        ``in_channels`` when not 1).

    Raises:
        CheckpointError: tensors no rule maps, non-tensor values, or missing / unexpected / wrongly shaped
            tensors for the network those arguments build (named by their upstream names).
    """
    source = os.fspath(source)
    upstream = _strip_prefix(upstream)
    unmapped = [k for k in upstream if not isinstance(k, str) or upstream_to_samv2_key(k) is None]
    if unmapped:
        raise CheckpointError(
            source,
            f"is not a SAM/SAMv2 checkpoint: {len(unmapped)} tensor(s) with no known upstream name: "
            f"{_list_keys([str(k) for k in unmapped])}",
        )
    not_tensors = [k for k, v in upstream.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(source, f"entries that are not tensors: {_list_keys(not_tensors)}")
    kwargs = _infer_upstream_kwargs(upstream, source)
    state_dict = {upstream_to_samv2_key(k): v for k, v in upstream.items()}
    try:
        with torch.device("meta"):  # shapes only: no memory, no random initialisation
            network = SAMv2Net(**kwargs)
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(source, f"no SAMv2Net has {format_network_kwargs(kwargs)}: {exc}") from exc
    check_state_dict(network, state_dict, source, key_name=samv2_to_upstream_key)
    return state_dict, kwargs


class _Unresolved:
    """Stands in for a class of the checkpoint's metadata whose module is not installed (e.g. mmcv's)."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Unresolved,), {"__module__": f"unresolved.{module}"})


# a "pickle module" for torch.load: the standard one, except that unknown classes do not abort loading
_lenient_pickle = types.ModuleType("_samv2_lenient_pickle")
_lenient_pickle.__dict__.update({k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
_lenient_pickle.Unpickler = _LenientUnpickler
_lenient_pickle.load = lambda file, **kw: _LenientUnpickler(file, **kw).load()


def load_upstream_checkpoint(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """Read an upstream checkpoint and return its state dict (upstream names).

    Accepts mmcv's ``{'meta': ..., 'state_dict': ...}`` (other entries such as ``optimizer`` are ignored) or a
    bare state dict; a ``module.`` prefix on every key (DataParallel) is removed.

    Security: mmcv checkpoints keep run metadata (config text, environment, hook messages, sometimes numpy
    scalars or mmcv objects) in ``meta``, which ``torch.load(weights_only=True)`` refuses, so this uses
    ``weights_only=False``, i.e. full unpickling, which can run arbitrary code from the file. **Only convert
    checkpoints from a source you trust** (the published ModelScope files or your own training runs). Classes
    of the metadata whose modules are not installed (mmcv, mmdet) are replaced by inert placeholders, so mmcv need
    not be installed.

    Raises:
        CheckpointError: the file is missing, cannot be read, or holds no state dict.
    """
    if not os.path.isfile(path):
        raise CheckpointError(path, "file not found" if not os.path.exists(path) else "is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_lenient_pickle)
    except Exception as exc:
        raise CheckpointError(path, f"cannot be read as a PyTorch checkpoint: {_one_line(exc)}") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            path, f"holds no state dict (expected {{'meta', 'state_dict'}} or a state dict), got {type(obj).__name__}"
        )
    return _strip_prefix(obj)


def _normalise_heads(heads: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(heads, str):
        heads = [h for h in re.split(r"[\s,\[\]()'\"]+", heads) if h]
    heads = tuple(str(h) for h in heads)
    unknown = [h for h in heads if h not in HEAD_NAMES]
    if unknown:
        raise CheckpointError("heads", f"unknown head name(s) {unknown}; choose from {HEAD_NAMES}")
    return tuple(h for h in HEAD_NAMES if h in heads)


def convert_upstream_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    width: float | None = None,
    heads: str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Convert an upstream SAM/SAMv2 checkpoint file to a bundle ``model.pt``.

    Reads ``checkpoint`` (see :func:`load_upstream_checkpoint`, trusted files only), renames its tensors, loads
    them into a fresh :class:`SAMv2Net` to verify them, and writes that network's plain state dict to ``output``
    atomically (:func:`~samv2_components.io.atomic.atomic_file`: an interrupted run leaves no partial
    ``model.pt``).

    Args:
        checkpoint: the upstream ``.pth`` file.
        output: where to write the state dict (parent folders are created).
        width, heads: what the caller expects; a checkpoint for another width or head set raises instead of
            being written.

    Returns:
        The :class:`SAMv2Net` arguments the weights need (``width``, ``heads``, ``embedding_dim``, and
        ``in_channels`` when not 1): pass them as ``network_def`` overrides to the bundle.

    Raises:
        CheckpointError: unreadable / non-SAM checkpoint, or one that disagrees with ``width`` / ``heads``.
    """
    checkpoint, output = os.fspath(checkpoint), os.fspath(output)
    if os.path.exists(output) and os.path.exists(checkpoint) and os.path.samefile(checkpoint, output):
        raise CheckpointError(output, "is the input checkpoint itself: choose another output file")
    upstream = load_upstream_checkpoint(checkpoint)
    state_dict, kwargs = convert_upstream_state_dict(upstream, checkpoint)
    if width is not None and not math.isclose(float(width), kwargs["width"], rel_tol=1e-6):
        raise CheckpointError(
            checkpoint,
            f"is for width={kwargs['width']!r} (stem has {round(kwargs['width'] * 64)} channels), "
            f"not the requested width={float(width)!r}",
        )
    if heads is not None:
        wanted = _normalise_heads(heads)
        if wanted != tuple(kwargs["heads"]):
            raise CheckpointError(
                checkpoint,
                f"has heads ({', '.join(kwargs['heads'])}), not the requested heads ({', '.join(wanted)})"
                + ("; SAM v1 checkpoints have no semantic head" if "semantic" in wanted else ""),
            )
    # verify by loading into a fresh network (built on the meta device: the checkpoint's tensors replace its
    # parameters, so no time is spent on a random initialisation that would be overwritten anyway)
    with torch.device("meta"):
        network = SAMv2Net(**kwargs)
    network.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}, strict=True, assign=True
    )
    to_save = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in network.state_dict().items()}
    bad = [k for k, v in to_save.items() if v.is_meta]
    if bad:  # cannot happen after a strict load; guards against writing a shapes-only file
        raise CheckpointError(checkpoint, f"conversion left tensors without data: {_list_keys(bad)}")

    with atomic_file(output) as tmp:
        torch.save(to_save, tmp)
    return kwargs
