"""Rigid fit between two point sets: weighted Kabsch/Arun least squares, and a robust RANSAC + trimming wrapper.

AdaReg (SAMv2 CT-MR registration) matches grid points of one scan into the other with anatomical embeddings and
fits a rigid transform to the pairs by the SVD least-squares method of Arun, Huang & Blostein (1987) / Kabsch,
with the reflection fix. The reference code had no outlier handling; :func:`fit_rigid_robust` adds RANSAC on
minimal 3-point samples, a refit on the inliers weighted by the match scores, and iterative trimming.

Conventions:

* Points are world coordinates in **millimetres**, ``(N, 3)``, both sets in one system (LPS in this project).
* Every transform maps **source -> target**: ``target_i ~ R @ source_i + t``. Its 4x4 ``matrix`` is homogeneous
  with column vectors: ``y = matrix[:3, :3] @ x + matrix[:3, 3]``.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np

from samv2_components.consensus import lo_msac
from samv2_components.geometry import apply_matrix, as_points, axis_angle_rotation, rotation_angle_deg

__all__ = ["RigidTransform", "RobustRigidFit", "fit_rigid", "fit_rigid_robust"]

# A 3-point sample whose triangle has sin(angle at the first vertex) below this is treated as collinear.
_COLLINEAR_SIN = 1e-3
# A point set whose second principal spread is below this fraction of the first is treated as collinear.
_COLLINEAR_SPREAD = 1e-6


class RigidTransform:
    """A rigid transform ``y = R @ x + t`` (source -> target), points in mm.

    Args:
        matrix: 4x4 homogeneous matrix (column vectors) whose upper-left 3x3 block is a rotation.
    """

    def __init__(self, matrix):
        m = np.array(matrix, dtype=np.float64)
        if m.shape != (4, 4):
            raise ValueError(f"matrix must be 4x4, got {m.shape}")
        self.matrix = m

    @classmethod
    def from_rotation_translation(cls, rotation, translation) -> RigidTransform:
        """Build from a 3x3 ``rotation`` and a ``(3,)`` ``translation`` (mm)."""
        m = np.eye(4)
        m[:3, :3] = np.asarray(rotation, dtype=np.float64)
        m[:3, 3] = np.asarray(translation, dtype=np.float64)
        return cls(m)

    @property
    def rotation(self) -> np.ndarray:
        """3x3 rotation ``R`` (a copy)."""
        return self.matrix[:3, :3].copy()

    @property
    def translation(self) -> np.ndarray:
        """``(3,)`` translation ``t``, mm (a copy)."""
        return self.matrix[:3, 3].copy()

    @property
    def rotation_angle_deg(self) -> float:
        """Angle of the rotation about its axis, degrees in ``[0, 180]``."""
        return rotation_angle_deg(self.matrix)

    def __call__(self, points) -> np.ndarray:
        """Map points ``(N, 3)`` (mm, source space) -> ``(N, 3)`` (mm, target space)."""
        return apply_matrix(self.matrix, as_points(points))

    def inverse(self) -> RigidTransform:
        """The target -> source transform ``x = R^T (y - t)``."""
        r, t = self.matrix[:3, :3], self.matrix[:3, 3]
        return RigidTransform.from_rotation_translation(r.T, -r.T @ t)

    def __repr__(self) -> str:
        t = ", ".join(f"{v:.3f}" for v in self.matrix[:3, 3])
        return f"RigidTransform(angle={self.rotation_angle_deg:.3f} deg, translation=[{t}] mm)"


class RobustRigidFit(NamedTuple):
    """Result of :func:`fit_rigid_robust`.

    Attributes:
        transform: the fitted :class:`RigidTransform` (source -> target); the identity if there were fewer than 3
            usable pairs.
        inliers: ``(N,)`` bool over **all** input pairs (pairs dropped by ``min_score`` are ``False``): the pairs
            the final fit used.
        n_inliers: ``inliers.sum()``.
        rms_residual_mm: root-mean-square residual ``|T(source) - target|`` of the inliers, mm (NaN if none).
        median_residual_mm: median residual of the inliers, mm (NaN if none).
        success: whether at least ``min_inliers`` pairs, not all on one line, agree with the transform.
        reason: why not, in one readable sentence (``""`` on success).
    """

    transform: RigidTransform
    inliers: np.ndarray
    n_inliers: int
    rms_residual_mm: float
    median_residual_mm: float
    success: bool
    reason: str


def _check_pairs(source, target) -> tuple[np.ndarray, np.ndarray]:
    x, y = as_points(source, "source"), as_points(target, "target")
    if x.shape != y.shape or len(x) == 0:
        raise ValueError(f"source {x.shape} and target {y.shape} must be equal, non-empty (N, 3) arrays")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("source and target must be finite (no NaN or inf)")
    return x, y


def _check_vector(values, n: int, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 2 and 1 in v.shape:
        v = v.ravel()
    if v.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return v


def _minimal_rotation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest rotation taking unit vector ``a`` to unit vector ``b`` (Rodrigues)."""
    v, c = np.cross(a, b), float(np.dot(a, b))
    if c < -1.0 + 1e-12:  # opposite: half turn about any axis perpendicular to a
        axis = np.cross(a, np.eye(3)[int(np.argmin(np.abs(a)))])
        axis /= np.linalg.norm(axis)
        return 2.0 * np.outer(axis, axis) - np.eye(3)
    sin = float(np.linalg.norm(v))
    if sin == 0.0:  # already aligned
        return np.eye(3)
    return axis_angle_rotation(v / sin, math.degrees(math.atan2(sin, c)))


def _kabsch(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted Kabsch on already-checked arrays; ``w`` non-negative with a positive sum. Returns the 4x4."""
    w = w / w.sum()
    x_mean, y_mean = w @ x, w @ y
    xc, yc = x - x_mean, y - y_mean
    h = (xc * w[:, None]).T @ yc  # cross-covariance sum_i w_i xc_i yc_i^T
    u, s, vt = np.linalg.svd(h)
    scale = float(np.sqrt(np.sum(w[:, None] * xc**2) * np.sum(w[:, None] * yc**2)))  # >= s[0]
    if scale <= 0.0:
        r = np.eye(3)  # one point (or all weight on coincident points): pure translation
    elif s[1] <= _COLLINEAR_SPREAD * scale:
        # Collinear: the rotation about the line is undetermined; take the smallest one that aligns the lines.
        r = _minimal_rotation(u[:, 0], vt[0])
    else:
        d = 1.0 if np.linalg.det(vt.T @ u.T) >= 0.0 else -1.0  # reflection fix (Arun 1987)
        r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = y_mean - r @ x_mean
    return m


def fit_rigid(source, target, weights=None) -> RigidTransform:
    """Weighted least-squares rigid transform ``source -> target`` (Kabsch / Arun et al. 1987).

    Minimises ``sum_i w_i |R x_i + t - y_i|^2`` over rotations ``R`` (``det R = +1``) and translations ``t``:
    weighted centroids ``x_mean, y_mean``, cross-covariance ``H = sum_i w_i (x_i - x_mean)(y_i - y_mean)^T``,
    ``H = U S V^T``, ``R = V diag(1, 1, det(V U^T)) U^T`` (the sign fix keeps a proper rotation even when the best
    orthogonal matrix would be a reflection, e.g. for mirrored or noisy planar points), ``t = y_mean - R x_mean``.

    Degenerate sets are handled without error: one point gives a pure translation; collinear points give the
    smallest rotation that aligns the two lines (the rotation about the line itself is undetermined).

    Args:
        source, target: ``(N, 3)`` corresponding points, mm, ``N >= 1``.
        weights: optional ``(N,)`` non-negative weights (e.g. match scores) with a positive sum.

    Returns:
        :class:`RigidTransform` mapping source points onto target points.
    """
    x, y = _check_pairs(source, target)
    if weights is None:
        w = np.ones(len(x))
    else:
        w = _check_vector(weights, len(x), "weights")
        if np.any(w < 0.0) or w.sum() <= 0.0:
            raise ValueError("weights must be non-negative with a positive sum")
    return RigidTransform(_kabsch(x, y, w))


def _is_collinear(points: np.ndarray) -> bool:
    if len(points) < 3:
        return True
    s = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)
    return bool(s[0] <= 0.0 or s[1] <= _COLLINEAR_SPREAD * s[0])


def _degenerate_triples(p: np.ndarray) -> np.ndarray:
    """Whether triples of points ``(..., 3, 3)`` are (nearly) coincident or collinear: ``(...)`` bool."""
    e1, e2 = p[..., 1, :] - p[..., 0, :], p[..., 2, :] - p[..., 0, :]
    n1, n2 = np.linalg.norm(e1, axis=-1), np.linalg.norm(e2, axis=-1)
    return (n1 <= 1e-9) | (n2 <= 1e-9) | (np.linalg.norm(np.cross(e1, e2), axis=-1) <= _COLLINEAR_SIN * n1 * n2)


def _residuals(m: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x @ m[:3, :3].T + m[:3, 3] - y, axis=1)


def _ransac(x, y, threshold: float, iterations: int, rng: np.random.Generator) -> np.ndarray | None:
    """Best inlier mask of RANSAC on 3-point samples, or ``None`` if every sample was degenerate."""
    n = len(x)
    if math.comb(n, 3) <= iterations:  # few pairs: try every triple once (deterministic, exhaustive)
        samples = itertools.combinations(range(n), 3)
    else:
        samples = (rng.choice(n, 3, replace=False) for _ in range(iterations))
    best, best_key = None, None
    ones = np.ones(3)
    for idx in samples:
        idx = list(idx)
        if _degenerate_triples(x[idx]) or _degenerate_triples(y[idx]):
            continue
        residual = _residuals(_kabsch(x[idx], y[idx], ones), x, y)
        inliers = residual <= threshold
        count = int(inliers.sum())
        key = (count, -float(np.mean(residual[inliers])) if count else 0.0)
        if best_key is None or key > best_key:
            best, best_key = inliers, key
    return best


def _lo_msac(x, y, threshold: float, iterations: int, rng: np.random.Generator, local_starts: int = 8) -> np.ndarray | None:
    """Inlier mask of LO-MSAC on 3-point samples: ``iterations`` random triples (degenerate ones, in either set,
    skipped) fitted at once (batched Kabsch), ranked by the MSAC cost and the ``local_starts`` best refitted on
    their inliers while the cost falls (:func:`samv2_components.consensus.lo_msac`); ``None`` if every sample was
    degenerate."""
    n = len(x)
    samples = rng.integers(0, n, (int(iterations), 3))
    samples = samples[(np.diff(np.sort(samples, axis=1), axis=1) > 0).all(1)]
    xs, ys = x[samples], y[samples]  # (K, 3, 3)
    ok = ~(_degenerate_triples(xs) | _degenerate_triples(ys))
    xs, ys = xs[ok], ys[ok]
    if not len(xs):
        return None
    xm, ym = xs.mean(1), ys.mean(1)
    u, _, vt = np.linalg.svd((xs - xm[:, None]).transpose(0, 2, 1) @ (ys - ym[:, None]))  # cross-covariances
    d = np.where(np.linalg.det(vt.transpose(0, 2, 1) @ u.transpose(0, 2, 1)) >= 0.0, 1.0, -1.0)  # reflection fix
    vt[:, 2] *= d[:, None]
    rotation = vt.transpose(0, 2, 1) @ u.transpose(0, 2, 1)  # (K, 3, 3): y = R x + t
    translation = ym - np.einsum("kij,kj->ki", rotation, xm)
    models = np.concatenate([rotation, translation[:, :, None]], axis=2)  # (K, 3, 4): y = R x + t
    return lo_msac(models, x, y, threshold, lambda xi, yi: _kabsch(xi, yi, np.ones(len(xi))), min_pairs=3,
                   local_starts=local_starts)


def fit_rigid_robust(
    source,
    target,
    scores=None,
    min_score: float | None = None,
    inlier_threshold_mm: float = 10.0,
    ransac_iterations: int = 500,
    min_inliers: int = 6,
    seed: int | None = 0,
    refine_rounds: int = 5,
    consensus: str = "count",
) -> RobustRigidFit:
    """Rigid transform ``source -> target`` robust to wrong matches: RANSAC, weighted refit, iterative trimming.

    Steps:

    1. Pairs with ``scores < min_score`` are dropped (when ``min_score`` is given).
    2. RANSAC: rigid fits to ``ransac_iterations`` random 3-point samples (every triple once when there are at
       most that many; collinear or coincident samples, in either set, are skipped); the hypothesis with the
       most pairs within ``inlier_threshold_mm`` wins, ties going to the lower mean inlier residual.
    3. Refit (:func:`fit_rigid`) on the inliers, weighted by the scores (clipped at 0) when given.
    4. Consensus refinement, at most ``refine_rounds`` rounds: keep the pairs (of all pairs kept in step 1) whose
       residual is at most ``inlier_threshold_mm``, refit; stop when the set is stable or would drop below
       ``min_inliers``. (An adaptive, median-based cutoff was tried and grew round by round on CT–MR matches with
       many wrong pairs until every pair counted as an inlier.)

    A fit that is not supported by the data is reported, never raised: ``success`` is ``False`` and ``reason``
    says why, when fewer than ``min_inliers`` pairs survive, or the inliers lie on one line. Only malformed input
    (shapes, NaN, bad parameters) raises :class:`ValueError`. The result depends only on the input and ``seed``.

    Args:
        source, target: ``(N, 3)`` corresponding points, mm (e.g. grid points of one scan and their matches in
            the other).
        scores: optional ``(N,)`` match scores (higher = more confident), used for ``min_score`` and as weights.
        min_score: drop pairs scoring below this (needs ``scores``).
        inlier_threshold_mm: residual (mm) within which a pair agrees with a hypothesis.
        ransac_iterations: RANSAC samples; 0 skips RANSAC (starts from a fit to all pairs).
        min_inliers: fewest inliers for ``success``.
        seed: seed of the sampling (``numpy.random.default_rng``).
        refine_rounds: trimming rounds at most.
        consensus: how step 2 ranks its hypotheses: ``"count"`` (most inliers, as above) or ``"lo-msac"`` (the MSAC
            cost, the 8 best refitted on their inliers while it falls; the ranking is then nearly independent of
            ``seed``: :func:`_lo_msac`).

    Returns:
        :class:`RobustRigidFit` with the transform, the ``(N,)`` inlier mask over the input pairs, inlier
        residual statistics (mm), ``success`` and ``reason``.
    """
    x_all, y_all = _check_pairs(source, target)
    n_all = len(x_all)
    if not inlier_threshold_mm > 0.0 or not math.isfinite(inlier_threshold_mm):
        raise ValueError(f"inlier_threshold_mm must be a positive number, got {inlier_threshold_mm!r}")
    if int(ransac_iterations) < 0 or int(refine_rounds) < 0 or int(min_inliers) < 1:
        raise ValueError("ransac_iterations and refine_rounds must be >= 0 and min_inliers >= 1")
    if consensus not in ("count", "lo-msac"):
        raise ValueError(f"consensus must be 'count' or 'lo-msac', got {consensus!r}")
    threshold, min_inliers = float(inlier_threshold_mm), int(min_inliers)
    weights_all = None
    keep = np.ones(n_all, dtype=bool)
    if scores is not None:
        s = _check_vector(scores, n_all, "scores")
        weights_all = np.clip(s, 0.0, None)
        if min_score is not None:
            keep = s >= float(min_score)
    elif min_score is not None:
        raise ValueError("min_score needs scores")

    kept = np.flatnonzero(keep)
    x, y = x_all[kept], y_all[kept]
    w = np.ones(len(kept)) if weights_all is None else weights_all[kept]

    def result(matrix, inliers_kept, success, reason) -> RobustRigidFit:
        inliers = np.zeros(n_all, dtype=bool)
        inliers[kept[inliers_kept]] = True
        n = int(inliers.sum())
        if n:
            r = _residuals(matrix, x[inliers_kept], y[inliers_kept])
            rms, med = float(np.sqrt(np.mean(r**2))), float(np.median(r))
        else:
            rms = med = math.nan
        return RobustRigidFit(RigidTransform(matrix), inliers, n, rms, med, bool(success), reason)

    filtered = f" with score >= {min_score:g}" if min_score is not None else ""
    if len(kept) < max(3, min_inliers):
        reason = f"only {len(kept)} of {n_all} point pairs{filtered}; need at least {max(3, min_inliers)}"
        return result(np.eye(4), np.zeros(len(kept), dtype=bool), False, reason)

    def refit(mask: np.ndarray) -> np.ndarray:
        wm = w[mask]
        return _kabsch(x[mask], y[mask], wm if wm.sum() > 0.0 else np.ones(len(wm)))

    rng = np.random.default_rng(seed)
    ransac = _ransac if consensus == "count" else _lo_msac
    inliers = ransac(x, y, threshold, int(ransac_iterations), rng) if ransac_iterations else None
    if inliers is None or inliers.sum() < 3:
        inliers = np.ones(len(x), dtype=bool)  # no usable sample: start from all pairs and let trimming work
    matrix = refit(inliers)
    for _ in range(int(refine_rounds)):
        residual = _residuals(matrix, x, y)
        # the consensus threshold stays fixed: an adaptive (median-based) cutoff can only grow here and, with many
        # wrong matches, grew round by round until every pair was an "inlier" (seen on CT-MR matches)
        new = residual <= threshold
        if new.sum() < max(3, min_inliers) or np.array_equal(new, inliers):
            break
        inliers = new
        matrix = refit(inliers)

    n_in = int(inliers.sum())
    if n_in < min_inliers:
        reason = (
            f"only {n_in} of {len(kept)} point pairs{filtered} agree with one rigid transform within "
            f"{threshold:g} mm; need at least {min_inliers}"
        )
        return result(matrix, inliers, False, reason)
    if _is_collinear(x[inliers]) or _is_collinear(y[inliers]):
        reason = "the inlier points lie on one line: the rotation about it is undetermined"
        return result(matrix, inliers, False, reason)
    return result(matrix, inliers, True, "")
