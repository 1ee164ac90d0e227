"""Registration: the ``samv2`` pipeline (candidates -> intensity refinement -> selection, the bundle default), AdaReg (embedding matches -> robust rigid fit -> crop -> deformable refinement, the
``crosssam_registration`` bundle) and classical baselines (SimpleITK) for comparison.

The rigid fit (:mod:`~samv2_components.registration.rigid`) needs only NumPy. The baselines need the
``registration`` extra (``pip install samv2-components[registration]``); SimpleITK is imported only when a function
runs, so importing this package works without it.
"""

from samv2_components.registration.adareg import (
    AdaReg,
    RigidRegistration,
    body_box_corners,
    body_mask,
    crop_index_range,
    grid_points_in_mask,
)
from samv2_components.registration.deformable import DeformableResult, refine_deformable, write_displacement_field
from samv2_components.registration.intensity_baselines import (
    IntensityRegistrationResult,
    read_sitk_crop,
    read_sitk_image,
    register_intensity,
)
from samv2_components.registration.orientation import (
    OrientationCandidate,
    OrientationSearch,
    axis_aligned_rotations,
    register_rigid_with_orientation_search,
    rotate_volume,
)
from samv2_components.registration.candidates import MatchSet, RigidCandidate, header_candidate, match_support, translation_vote
from samv2_components.registration.edge_agreement import footprint_edge_agreement
from samv2_components.registration.intensity_refinement import IntensityRefiner, RefinedCandidate, ScanPair
from samv2_components.registration.pipeline import PIPELINES, SAMv2RigidPipeline
from samv2_components.registration.selection import ScoredCandidate, Selection, select_candidate
from samv2_components.registration.translation_search import TranslationPeak, TranslationSearch
from samv2_components.registration.turn_search import IntensityTiltSearch, IntensityTurnSearch, TurnCandidate
from samv2_components.registration.rigid import RigidTransform, RobustRigidFit, fit_rigid, fit_rigid_robust
from samv2_components.registration.workflow import AdaRegWorkflow, RegistrationFailed

__all__ = [
    "AdaReg",
    "IntensityRefiner",
    "IntensityTiltSearch",
    "IntensityTurnSearch",
    "MatchSet",
    "PIPELINES",
    "RefinedCandidate",
    "RigidCandidate",
    "SAMv2RigidPipeline",
    "ScanPair",
    "ScoredCandidate",
    "Selection",
    "TranslationPeak",
    "TranslationSearch",
    "TurnCandidate",
    "footprint_edge_agreement",
    "header_candidate",
    "match_support",
    "select_candidate",
    "translation_vote",
    "AdaRegWorkflow",
    "RegistrationFailed",
    "RigidRegistration",
    "body_box_corners",
    "body_mask",
    "crop_index_range",
    "grid_points_in_mask",
    "DeformableResult",
    "refine_deformable",
    "write_displacement_field",
    "IntensityRegistrationResult",
    "OrientationCandidate",
    "OrientationSearch",
    "axis_aligned_rotations",
    "register_rigid_with_orientation_search",
    "rotate_volume",
    "RigidTransform",
    "RobustRigidFit",
    "fit_rigid",
    "fit_rigid_robust",
    "read_sitk_crop",
    "read_sitk_image",
    "register_intensity",
]
