"""Modality-aware intensity normalisation with parity to the SAMv2 reference implementation.

* CT: clip to [-1024, 3071] HU, map linearly to [0, 255], subtract 50, i.e. [-50, 205].
* MR: clip to the 0.2 / 99.8 intensity percentiles, map to [0, 255], subtract 50.

Both are MONAI transforms (``ScaleIntensityRange`` / ``ScaleIntensityRangePercentiles``); this module only
chooses between them. The modality is always explicit: a fixed ``modality`` argument or a per-sample
``modality_key`` (e.g. from a datalist), never guessed from the intensities.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensityRange, ScaleIntensityRangePercentiles

from samv2_components.errors import SAMv2InputError, parse_bool
from samv2_components.modality import MODALITIES, check_modality  # re-exported: their old home

__all__ = ["MODALITIES", "check_modality", "NormalizeIntensityByModalityd"]

logger = logging.getLogger("samv2_components")


class NormalizeIntensityByModalityd(MapTransform):
    """Normalise CT or MR intensities to the network's input range (default [-50, 205]).

    Args:
        keys: image keys to normalise.
        modality: ``"ct"`` or ``"mr"`` for every sample; if None, read from ``data[modality_key]``.
        modality_key: per-sample modality key, used when ``modality`` is None.
        ct_window: HU window mapped to ``output_range``.
        mr_percentiles: lower/upper percentiles mapped to ``output_range`` for MR.
        output_range: target range (reference: 0..255 minus 50).
        strict_modality_check: raise :class:`SAMv2InputError` instead of warning when the intensities contradict
            the modality (a "CT" with no voxel below -200 HU; an "MR" with at least 5 % of its voxels below
            -500, i.e. CT air in HU). Registration needs the roles right, so its bundle sets it.
    """

    def __init__(
        self,
        keys: KeysCollection,
        modality: str | None = None,
        modality_key: str = "modality",
        ct_window: Sequence[float] = (-1024.0, 3071.0),
        mr_percentiles: Sequence[float] = (0.2, 99.8),
        output_range: Sequence[float] = (-50.0, 205.0),
        strict_modality_check: bool = False,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.strict_modality_check = parse_bool(strict_modality_check, "strict_modality_check")
        self.modality = None if modality is None else check_modality(modality, "modality")
        self.modality_key = modality_key
        lo, hi = output_range
        self.ct = ScaleIntensityRange(a_min=ct_window[0], a_max=ct_window[1], b_min=lo, b_max=hi, clip=True)
        self.mr = ScaleIntensityRangePercentiles(
            lower=mr_percentiles[0], upper=mr_percentiles[1], b_min=lo, b_max=hi, clip=True, relative=False
        )

    def _modality_of(self, d: Mapping[Hashable, Any], image: Any) -> str:
        if self.modality is not None:
            return self.modality
        source = _source_name(image)
        if self.modality_key not in d:
            raise SAMv2InputError(source, f"no modality given: set modality to 'ct' or 'mr' (key {self.modality_key!r})")
        return check_modality(d[self.modality_key], source)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            modality = self._modality_of(d, image)
            self._check_modality_fits(image, modality)
            d[key] = self.ct(image) if modality == "ct" else self.mr(image)
        return d


    def _check_modality_fits(self, image: Any, modality: str) -> None:
        values = torch.as_tensor(image)
        problem = None
        if modality == "ct" and float(values.min()) > -200.0:
            # CT air is about -1000 HU; a scan without any value below -200 is probably not in HU (an MR?)
            problem = "modality is 'ct' but no voxel is below -200 HU; is this really a CT in Hounsfield units?"
        elif modality == "mr":
            below = float((values < -500.0).float().mean())
            if below >= 0.05:
                problem = f"modality is 'mr' but {100 * below:.0f} % of the voxels are below -500, like CT air in HU; is this a CT?"
        if problem is None:
            return
        if self.strict_modality_check:
            raise SAMv2InputError(_source_name(image), problem)
        logger.warning("%s: %s", _source_name(image), problem)


def _source_name(image: Any) -> str | None:
    meta = getattr(image, "meta", None)
    return None if meta is None else meta.get("filename_or_obj")
