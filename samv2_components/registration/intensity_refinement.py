"""Intensity refinement of a rigid candidate, restricted to the region both scans cover.

A candidate from the embeddings (:mod:`~samv2_components.registration.candidates`) is right to within a voxel of
the embedding grid at best; mutual information sharpens it. The refinement is
:func:`~samv2_components.registration.intensity_baselines.register_intensity` (rigid, Mattes MI, multi-resolution,
RegularStepGradientDescent) started from the candidate, with the metric restricted to the **overlap mask**: the
fixed body and the moving body mapped onto the fixed grid through the candidate, intersected and dilated by
``overlap_margin_mm`` (so the body outline, MI's strongest cue, is inside). Without it a slab or a cropped scan
lets the metric prefer whatever pose hides the missing anatomy.

Every refined candidate is then scored on the same footing (:meth:`IntensityRefiner.score`): Mattes MI with full
sampling on one common mask (the fixed body dilated by the margin, the same for every candidate), and the overlap
fraction ``|fixed body ∩ M^-1(moving body)| / min(|fixed body|, |moving body|)`` (volumes, mm³).

Inputs are the bundle's preprocessed scans ``(1, D, H, W)`` MetaTensors (isotropic voxels, normalised intensity,
affine in RAS or LPS) and their body masks ``(D, H, W)``; they are converted to SimpleITK images (physical space =
LPS). Every matrix is a 4x4 rigid **fixed -> moving** map, LPS mm.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor

from samv2_components.errors import SAMv2InputError
from samv2_components.registration.intensity_baselines import (
    _sitk,
    matrix_to_sitk_transform,
    read_sitk_image,
    register_intensity,
    sitk_transform_to_matrix,
)

__all__ = ["IntensityRefiner", "RefinedCandidate", "ScanPair", "mattes_mi", "overlap_mask"]


@dataclass
class ScanPair:
    """The two preprocessed scans and their body masks as SimpleITK images (float32 / uint8, LPS physical space)."""

    fixed: object
    moving: object
    fixed_body: object
    moving_body: object

    @classmethod
    def from_metatensors(cls, fixed: MetaTensor, fixed_mask: torch.Tensor, moving: MetaTensor,
                         moving_mask: torch.Tensor) -> ScanPair:
        """From preprocessed scans ``(1, D, H, W)`` and body masks ``(D, H, W)`` (bool) on the same grids."""

        def as_mask(image: MetaTensor, mask: torch.Tensor):
            return read_sitk_image(MetaTensor(mask[None].float(), affine=image.affine, meta=dict(image.meta)), "body", "uint8")

        return cls(read_sitk_image(fixed, "fixed"), read_sitk_image(moving, "moving"), as_mask(fixed, fixed_mask),
                   as_mask(moving, moving_mask))


@dataclass
class RefinedCandidate:
    """A candidate after intensity refinement.

    Attributes:
        name: the candidate's name.
        initial, fixed_to_moving: 4x4 LPS, fixed -> moving, before and after refinement.
        mi: Mattes MI (nats, higher is better) on the common mask, full sampling (:meth:`IntensityRefiner.score`).
        overlap_fraction: shared body volume / smaller body volume, after refinement.
        seconds: refinement and scoring time.
        error: why the refinement failed (then ``fixed_to_moving`` is the initial matrix, ``mi`` NaN), else "".
    """

    name: str
    initial: np.ndarray
    fixed_to_moving: np.ndarray
    mi: float
    overlap_fraction: float
    seconds: float
    error: str = ""


def _radius(image, margin_mm: float) -> list[int]:
    return [max(0, int(round(margin_mm / s))) for s in image.GetSpacing()]


def overlap_mask(pair: ScanPair, fixed_to_moving: np.ndarray, margin_mm: float):
    """The region both scans cover under ``fixed_to_moving``, on the fixed grid: ``(mask uint8, overlap fraction)``.

    ``mask`` = (fixed body ∩ moving body mapped through the transform), dilated by ``margin_mm``; the fraction is
    the shared body volume over the smaller body's volume (0 when they do not meet).
    """
    sitk = _sitk()
    mapped = sitk.Resample(pair.moving_body, pair.fixed_body, matrix_to_sitk_transform(fixed_to_moving),
                           sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    shared = sitk.And(pair.fixed_body, mapped)
    voxel_ml = lambda im: float(np.prod(im.GetSpacing()))  # noqa: E731  mm^3 per voxel
    n_shared = float(sitk.GetArrayViewFromImage(shared).sum()) * voxel_ml(shared)
    smaller = min(float(sitk.GetArrayViewFromImage(pair.fixed_body).sum()) * voxel_ml(pair.fixed_body),
                  float(sitk.GetArrayViewFromImage(pair.moving_body).sum()) * voxel_ml(pair.moving_body))
    fraction = n_shared / smaller if smaller > 0 else 0.0
    if margin_mm > 0:
        shared = sitk.BinaryDilate(shared, _radius(shared, margin_mm))
    return shared, fraction


def mattes_mi(fixed, moving, fixed_to_moving: np.ndarray, mask, bins: int = 50) -> float:
    """Mattes mutual information (nats, >= 0, higher = better aligned) of ``moving`` through ``fixed_to_moving``
    against ``fixed``, every voxel of ``mask`` (on the fixed grid) that maps inside the moving scan; NaN when none
    does."""
    sitk = _sitk()
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetMetricFixedMask(mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(matrix_to_sitk_transform(fixed_to_moving))
    try:
        return -float(reg.MetricEvaluate(fixed, moving))  # ITK's Mattes metric is the negated MI
    except RuntimeError:  # every sample maps outside the moving scan
        return float("nan")


class IntensityRefiner:
    """Rigid Mattes-MI refinement of candidates on the overlap mask, and their common scoring (module docstring).

    Args:
        shrink_factors, smoothing_sigmas_mm: the resolution pyramid (on the 2 mm preprocessed scans).
        sampling_percentage: fraction of the masked fixed voxels sampled per iteration (seeded).
        iterations: optimizer iterations cap per level.
        learning_rate_mm, min_step_mm: RegularStepGradientDescent steps (~mm of motion).
        overlap_margin_mm: dilation of the shared body region (refinement and scoring masks).
        bins: Mattes histogram bins.
        seed: sampling seed.
    """

    def __init__(
        self,
        shrink_factors: Sequence[int] = (4, 2, 1),
        smoothing_sigmas_mm: Sequence[float] = (4.0, 2.0, 1.0),
        sampling_percentage: float = 0.1,
        iterations: int = 100,
        learning_rate_mm: float = 2.0,
        min_step_mm: float = 0.01,
        overlap_margin_mm: float = 10.0,
        bins: int = 50,
        seed: int = 0,
    ):
        if len(list(shrink_factors)) != len(list(smoothing_sigmas_mm)):
            raise SAMv2InputError("smoothing_sigmas_mm", "needs one value per shrink factor")
        self.shrink_factors, self.smoothing_sigmas_mm = [int(s) for s in shrink_factors], [float(s) for s in smoothing_sigmas_mm]
        self.sampling_percentage, self.iterations = float(sampling_percentage), int(iterations)
        self.learning_rate_mm, self.min_step_mm = float(learning_rate_mm), float(min_step_mm)
        self.overlap_margin_mm, self.bins, self.seed = float(overlap_margin_mm), int(bins), int(seed)

    def common_mask(self, pair: ScanPair):
        """The scoring mask shared by every candidate: the fixed body dilated by the margin (fixed grid)."""
        return _sitk().BinaryDilate(pair.fixed_body, _radius(pair.fixed_body, self.overlap_margin_mm))

    def score(self, pair: ScanPair, fixed_to_moving: np.ndarray, common_mask) -> tuple[float, float]:
        """``(MI on the common mask, overlap fraction)`` of a transform."""
        _, fraction = overlap_mask(pair, fixed_to_moving, 0.0)
        return mattes_mi(pair.fixed, pair.moving, fixed_to_moving, common_mask, self.bins), fraction

    def __call__(self, pair: ScanPair, name: str, initial: np.ndarray, common_mask, min_overlap: float = 0.0) -> RefinedCandidate:
        """Refine one candidate (``initial``: fixed -> moving 4x4 LPS) and score it. A candidate whose overlap
        fraction is below ``min_overlap`` is not refined (nothing to refine on)."""
        t0 = time.perf_counter()
        initial = np.asarray(initial, dtype=np.float64)
        mask, fraction = overlap_mask(pair, initial, self.overlap_margin_mm)
        error = ""
        if fraction <= min_overlap or not sitk_any(mask):
            error = f"body overlap {fraction:.2f} at the start"
            matrix = initial
        else:
            try:
                result = register_intensity(
                    pair.fixed, pair.moving, transform="rigid", metric="mattes", shrink_factors=self.shrink_factors,
                    smoothing_sigmas_mm=self.smoothing_sigmas_mm, sampling_percentage=self.sampling_percentage,
                    iterations=self.iterations, seed=self.seed, fixed_mask=mask, learning_rate_mm=self.learning_rate_mm,
                    min_step_mm=self.min_step_mm, initial_transform=initial,
                )
                matrix = sitk_transform_to_matrix(result.transform)
            except SAMv2InputError as exc:  # e.g. every sample left the moving scan
                error, matrix = str(exc), initial
        mi, fraction = self.score(pair, matrix, common_mask)
        if error:
            mi = float("nan")
        return RefinedCandidate(name, initial, matrix, mi, fraction, time.perf_counter() - t0, error)


def sitk_any(image) -> bool:
    """Whether a SimpleITK mask has any foreground voxel."""
    return bool(_sitk().GetArrayViewFromImage(image).any())
