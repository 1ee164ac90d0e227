"""Classical registration baselines (SimpleITK), for comparison with SAMv2 point matching in the benchmarks.

Needs the ``registration`` extra (``pip install samv2-components[registration]``); SimpleITK is imported only
when a function runs, so importing this package works without it.
"""

from samv2_components.registration.intensity_baselines import (
    IntensityRegistrationResult,
    read_sitk_image,
    register_intensity,
)

__all__ = ["IntensityRegistrationResult", "read_sitk_image", "register_intensity"]
