from samv2_components.transforms.aggressive_intensity import (
    RandBezierIntensity,
    RandBezierIntensityd,
    RandIntensityInversion,
    RandIntensityInversiond,
    aggressive_intensity_augmentation,
)
from samv2_components.transforms.intensity import MODALITIES, NormalizeIntensityByModalityd, check_modality
from samv2_components.transforms.patch_pairs import RandPatchPaird

__all__ = [
    "MODALITIES",
    "NormalizeIntensityByModalityd",
    "RandBezierIntensity",
    "RandBezierIntensityd",
    "RandIntensityInversion",
    "RandIntensityInversiond",
    "RandPatchPaird",
    "aggressive_intensity_augmentation",
    "check_modality",
]
