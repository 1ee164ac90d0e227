"""The two modalities the networks are trained for, and the one check of a user-supplied modality name.

A bottom-layer helper (it imports only :mod:`samv2_components.errors`), so that file readers, transforms,
workflows and the bundle tools can all check a modality without importing each other.
"""

from __future__ import annotations

from typing import Any

from samv2_components.errors import SAMv2InputError

__all__ = ["MODALITIES", "check_modality"]

MODALITIES = ("ct", "mr")


def check_modality(modality: Any, source: str | None = None) -> str:
    """Return ``"ct"`` or ``"mr"`` (case-insensitive input), else raise :class:`SAMv2InputError`."""
    value = str(modality).strip().lower() if modality is not None else ""
    if value not in MODALITIES:
        raise SAMv2InputError(source, f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    return value
