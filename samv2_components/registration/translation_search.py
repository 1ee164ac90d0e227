"""Exhaustive translation search of mutual information for a fixed rotation, at a coarse level: where the small-FOV
scan's footprint fits in the large scan.

An intensity registration converges only from a start inside its capture range (a few cm at best); a slab or a
cropped scan can lie anywhere along the body, and the embedding candidates put it there only loosely. Measured on
the phantom benchmark's validation draw (seed 1): on every case the pipeline failed, the refinement started from the
truth reached a higher footprint MI than every candidate (the score was right, the starts were not), and perturbing
the candidates by ±20 mm / ±20° and refining again did not reach the truth either. This search gives the
refinement starts from the whole translation range instead.

For a rotation ``R`` (small -> large scan, world) the large scan is resampled once, onto the small scan's coarse
grid turned by ``R`` and padded by ``range_mm`` on every side; every translation of the grid then is an integer
voxel shift of that resampled volume, and the joint histogram of (small footprint intensities, shifted large
intensities) is a gather and a ``bincount`` for all shifts at once. The score is plain histogram MI (nats) on the
footprint's voxels, the same samples for every shift; voxels that fall outside the large scan take its background
value (a pose that pushes the small body out of the large one pays for it, as in
:func:`~samv2_components.registration.intensity_refinement.footprint_mi`).

Conventions: world points and matrices are LPS mm (SimpleITK's physical space); every matrix is a 4x4 rigid
**fixed -> moving** map, converted through :class:`~samv2_components.registration.intensity_refinement.ScanPair`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from samv2_components.errors import SAMv2InputError
from samv2_components.registration.intensity_baselines import _sitk
from samv2_components.registration.intensity_refinement import ScanPair

__all__ = ["TranslationPeak", "TranslationSearch", "histogram_mi"]


@dataclass
class TranslationPeak:
    """One local maximum of the translation search.

    Attributes:
        fixed_to_moving: 4x4 LPS mm, the pose (the given rotation, the shift's translation).
        score: histogram MI (nats) of the footprint at that pose, on the coarse level.
        shift_mm: the shift from the start pose along the turned grid's axes ``(3,)``.
    """

    fixed_to_moving: np.ndarray
    score: float
    shift_mm: np.ndarray


def _bin(values: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    scale = (bins - 1e-6) / max(hi - lo, 1e-12)
    return np.clip(((values - lo) * scale).astype(np.int64), 0, bins - 1)


def histogram_mi(joint: np.ndarray) -> np.ndarray:
    """MI (nats) of joint histograms ``(..., B, B)`` of counts; ``(...)``."""
    joint = joint.astype(np.float64)
    total = joint.sum(axis=(-2, -1), keepdims=True)
    p = joint / np.maximum(total, 1.0)
    pa, pb = p.sum(-1, keepdims=True), p.sum(-2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / (pa * pb)), 0.0)
    return terms.sum(axis=(-2, -1))


class TranslationSearch:
    """Score every translation on a grid for a fixed rotation (module docstring).

    Args:
        shrink_factor, smoothing_sigma_mm: the coarse level (of the 2 mm preprocessed scans).
        range_mm: the search covers ``±range_mm`` along each axis of the turned grid around the start pose.
        step_mm: the grid's step (rounded to whole coarse voxels, at least one).
        bins: histogram bins per image.
        peaks: how many local maxima to return (best first); maxima closer than ``peak_separation_mm`` to a better
            one are the same answer.
        max_samples: at most this many footprint voxels carry the histogram (a seeded random subset of a large
            footprint: the cost grows with samples x shifts).
        max_samples_per_chunk: memory cap of the gather (shifts x footprint voxels per chunk).
        seed: the subset's seed.
    """

    def __init__(
        self,
        shrink_factor: int = 2,
        smoothing_sigma_mm: float = 2.0,
        range_mm: float = 80.0,
        step_mm: float = 8.0,
        bins: int = 32,
        peaks: int = 2,
        peak_separation_mm: float = 24.0,
        max_samples: int = 20_000,
        max_samples_per_chunk: int = 2_000_000,
        seed: int = 0,
    ):
        if int(shrink_factor) < 1 or float(step_mm) <= 0 or float(range_mm) < 0 or int(bins) < 2 or int(peaks) < 1:
            raise SAMv2InputError("translation_search", "needs shrink_factor >= 1, step_mm > 0, range_mm >= 0, bins >= 2, peaks >= 1")
        self.shrink_factor, self.smoothing_sigma_mm = int(shrink_factor), float(smoothing_sigma_mm)
        self.range_mm, self.step_mm, self.bins = float(range_mm), float(step_mm), int(bins)
        self.peaks, self.peak_separation_mm = int(peaks), float(peak_separation_mm)
        self.max_samples, self.max_samples_per_chunk, self.seed = int(max_samples), int(max_samples_per_chunk), int(seed)

    def _footprint_samples(self, coarse: ScanPair, footprint_margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """The small scan's side, the same for every rotation: footprint voxels ``(n, 3)`` (z, y, x; a seeded
        subset of at most ``max_samples``) and their intensity bins ``(n,)``. Cached on the coarse pair."""
        key = ("translation_samples", float(footprint_margin_mm), self.max_samples, self.seed, self.bins)
        if key not in coarse.cache:
            sitk = _sitk()
            footprint = sitk.GetArrayViewFromImage(coarse.footprint(footprint_margin_mm)) > 0  # (z, y, x)
            if not footprint.any():
                raise SAMv2InputError("body", "the small scan's footprint is empty at the coarse level")
            zyx = np.argwhere(footprint)
            if len(zyx) > self.max_samples:
                zyx = zyx[np.sort(np.random.default_rng(self.seed).choice(len(zyx), self.max_samples, replace=False))]
            values = sitk.GetArrayViewFromImage(coarse.small_image)[tuple(zyx.T)].astype(np.float64)
            coarse.cache[key] = (zyx, _bin(values, values.min(), values.max(), self.bins))
        return coarse.cache[key]

    def __call__(self, pair: ScanPair, start: np.ndarray, footprint_margin_mm: float) -> list[TranslationPeak]:
        """The best translations for the rotation of ``start`` (fixed -> moving 4x4 LPS), best first.

        The shifts are measured from ``start``'s own translation, so the search is centred on the start pose.
        ``footprint_margin_mm``: the small scan's body dilated by this much is the footprint (the refiner's
        ``overlap_margin_mm``, so that the search and the refinement look at the same region).
        """
        sitk = _sitk()
        coarse = pair.coarse(self.shrink_factor, self.smoothing_sigma_mm)
        small, large = coarse.small_image, coarse.large_image
        zyx, a = self._footprint_samples(coarse, footprint_margin_mm)
        spacing = np.asarray(small.GetSpacing(), dtype=np.float64)  # (x, y, z)
        pad = np.ceil(self.range_mm / spacing).astype(np.int64)  # voxels of range per axis
        s2l = pair.small_to_large(start).copy()
        u, _, vt = np.linalg.svd(s2l[:3, :3])  # the nearest proper rotation (a start read back from JSON is rounded)
        s2l[:3, :3] = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
        rotation = s2l[:3, :3]
        direction = np.asarray(small.GetDirection(), dtype=np.float64).reshape(3, 3)
        turned = rotation @ direction  # the turned grid's axes in the large scan's world
        # the turned grid: the small grid mapped through the start pose, padded by `pad` voxels on every side
        origin = s2l[:3, :3] @ np.asarray(small.GetOrigin()) + s2l[:3, 3] - turned @ (pad * spacing)
        size = np.asarray(small.GetSize()) + 2 * pad
        reference = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
        reference.SetSpacing(spacing.tolist())
        reference.SetOrigin(origin.tolist())
        reference.SetDirection(turned.ravel().tolist())
        background = coarse.background()
        resampled = sitk.GetArrayFromImage(sitk.Resample(large, reference, sitk.Transform(3, sitk.sitkIdentity),
                                                         sitk.sitkLinear, background, sitk.sitkFloat32))  # (z, y, x)
        b = _bin(resampled, float(resampled.min()), float(resampled.max()), self.bins).ravel()
        zyx = zyx + pad[::-1]  # in the padded grid
        strides = np.array([size[1] * size[0], size[0], 1], dtype=np.int64)
        base = zyx @ strides
        step = np.maximum(1, np.round(self.step_mm / spacing)).astype(np.int64)
        axes = [np.arange(-p, p + 1, st) for p, st in zip(pad, step)]
        shifts_xyz = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)  # (K, 3) voxels along x, y, z
        offsets = shifts_xyz[:, ::-1] @ strides
        joint_index = a * self.bins
        chunk = max(1, self.max_samples_per_chunk // len(base))
        scores = np.empty(len(offsets))
        for i in range(0, len(offsets), chunk):
            off = offsets[i:i + chunk]
            codes = joint_index[None, :] + b[base[None, :] + off[:, None]] + (np.arange(len(off)) * self.bins**2)[:, None]
            joint = np.bincount(codes.ravel(), minlength=len(off) * self.bins**2).reshape(len(off), self.bins, self.bins)
            scores[i:i + chunk] = histogram_mi(joint)
        return self._peaks(pair, s2l, turned, spacing, shifts_xyz, scores)

    def _peaks(self, pair, s2l, turned, spacing, shifts_xyz, scores) -> list[TranslationPeak]:
        shifts_mm = shifts_xyz * spacing  # along the turned grid's axes
        peaks: list[TranslationPeak] = []
        for k in np.argsort(-scores):
            if any(np.linalg.norm(shifts_mm[k] - p.shift_mm) < self.peak_separation_mm for p in peaks):
                continue
            g = s2l.copy()
            g[:3, 3] = s2l[:3, 3] + turned @ shifts_mm[k]
            peaks.append(TranslationPeak(pair.fixed_to_moving(g), float(scores[k]), shifts_mm[k]))
            if len(peaks) == self.peaks:
                break
        return peaks
