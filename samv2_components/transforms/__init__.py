from samv2_components.transforms.intensity import MODALITIES, NormalizeIntensityByModalityd, check_modality
from samv2_components.transforms.patch_pairs import RandPatchPaird

__all__ = ["MODALITIES", "NormalizeIntensityByModalityd", "RandPatchPaird", "check_modality"]
