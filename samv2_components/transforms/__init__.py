from samv2_components.transforms.aggressive_intensity import (
    RandBezierIntensity,
    RandBodyContrastRemap,
    RandBezierIntensityd,
    RandIntensityInversion,
    RandIntensityInversiond,
    aggressive_intensity_augmentation,
)
from samv2_components.transforms.intensity import MODALITIES, NormalizeIntensityByModalityd, check_modality
from samv2_components.transforms.patch_pairs import RandPatchPaird
from samv2_components.transforms.slab_resample import SlabResampled
from samv2_components.transforms.synthetic_contrast import RandSynthContrastd, TissueClassesd
from samv2_components.transforms.registered_pairs import (
    RandRegisteredPatchd,
    load_registered_datalist,
    registered_pair,
    save_registered_pair,
)

__all__ = [
    "MODALITIES",
    "NormalizeIntensityByModalityd",
    "RandBezierIntensity",
    "RandBezierIntensityd",
    "RandBodyContrastRemap",
    "RandIntensityInversion",
    "RandIntensityInversiond",
    "RandPatchPaird",
    "RandRegisteredPatchd",
    "RandSynthContrastd",
    "SlabResampled",
    "TissueClassesd",
    "aggressive_intensity_augmentation",
    "check_modality",
    "load_registered_datalist",
    "registered_pair",
    "save_registered_pair",
]
