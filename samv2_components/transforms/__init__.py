from samv2_components.transforms.intensity import MODALITIES, NormalizeIntensityByModalityd, check_modality

__all__ = ["MODALITIES", "NormalizeIntensityByModalityd", "check_modality"]
