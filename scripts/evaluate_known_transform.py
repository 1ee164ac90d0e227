"""Point-matching accuracy with exact ground truth: a real scan against a known random deformation of itself.

What it does:

1. Loads ``--image`` (any ITK-readable 3D scan; default the held-out chest CT) as the **template**.
2. Draws a random transform (``--seed``) and resamples the template into a **query** scan with it (below).
3. Picks ``--num_points`` template points: voxel centres with intensity > ``--min_hu`` (inside the body) and at
   least ``--border_mm`` from the scan border, drawn with ``--seed``; their exact correspondences in the query
   are known from the transform.
4. Embeds both scans through the *same* bundle preprocessing (``bundles/semantic_sam/configs/inference.json``,
   section ``preprocessing``) and the bundle's ``inferer`` (:class:`SAMv2Inferer`), matches every template point
   by exhaustive nearest neighbour (:func:`samv2_components.matching.match_nearest_neighbour`, sub-voxel
   refinement on) and reports, per model, MED, MEDx/y/z, median, 90th percentile, max, CPM@10 mm, mean score and
   timings as a Markdown table. A "no matching" row gives the error of answering the template position itself
   (the size of the motion to recover).

The transform (all points world **LPS mm**; ``c`` = centre of the template's voxel grid)::

    G(p)  = c + t + s R (p - c)                        affine part, template -> query
    u(x)  = per component i: sum_k a_ik sin(w_ik . x + phi_ik)    smooth displacement, defined on query points
    T(x)  = G^-1(x + u(x))                             query point -> template point (what resampling needs)
    gt(p) = T^-1(p) = the x with x + u(x) = G(p)       solved by the fixed-point iteration x <- G(p) - u(x)

* ``R`` = Rz(gamma) Ry(beta) Rx(alpha), each angle uniform in +-``max_rotation_deg`` (10 degrees); ``s`` uniform
  in ``scale_range`` (0.9-1.1, isotropic); ``t`` uniform in +-``max_translation_mm`` (20 mm) per axis.
* Elastic part: ``n_modes`` (4) sine waves per displacement component, random directions, wavelengths uniform in
  ``wavelength_mm`` (80-160 mm: the smoothness), random phases, amplitudes scaled so that
  ``sum_k |a_ik| = elastic_mm / sqrt(3)``, hence ``|u(x)| <= elastic_mm`` (5 mm) everywhere. The realised maximum
  and RMS of ``|u|`` over the query are printed. ``|du/dx|`` is bounded by
  ``sqrt(3) * (elastic_mm / sqrt(3)) * 2 pi / min(wavelength)`` (0.39 with the defaults); the generator
  refuses a bound >= 0.9, so ``x + u(x)`` stays invertible and the fixed-point iteration contracts.
  The iteration stops at a change below 1e-6 mm, so ``T(gt(p)) = p`` to well within 0.05 mm (tested).

The query has the template's voxel spacing and axis directions, with its origin and size chosen to cover the
whole transformed template (mapped corners plus ``elastic_mm``); each query voxel ``x`` takes the template's
trilinear value at ``T(x)``, the template minimum (air) outside it. It is written as NIfTI to a temporary folder
and read back through the bundle preprocessing exactly like the template.

Examples::

    python scripts/evaluate_known_transform.py                                  # held-out chest CT, random weights
    python scripts/evaluate_known_transform.py --ckpt bundles/semantic_sam/models/model.pt --output eval.md
    python scripts/evaluate_known_transform.py --image samv2_components/sample_data/ct_abdomen.nii.gz --num_points 100

Timings are wall-clock seconds on the machine that ran it (preprocessing + embedding per scan; NN matching of all
points); the table states the device. Random weights (``--ckpt`` not given, or the ``random`` row of
``--compare_random``) are a floor, not a result: a random network is drawn with ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire
import monai
import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from samv2_components.geometry import convert_affine, voxel_to_world, world_to_voxel
from samv2_components.io.image import load_scan
from samv2_components.matching import match_nearest_neighbour
from samv2_components.metrics import summarize_errors
from samv2_components.networks import HEAD_NAMES, SAMv2Net
from samv2_components.networks.weights import load_weights
from samv2_components.transforms.patch_pairs import sample_at_voxels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundles", "semantic_sam")
DEFAULT_IMAGE = "/work/shared/data/body_ct/lung2_image.nrrd"


# ---------------------------------------------------------------------------------------------- the transform
def _rotation(angles_rad) -> np.ndarray:
    """``Rz(g) @ Ry(b) @ Rx(a)`` for ``angles_rad = (a, b, g)`` about the LPS x, y, z axes."""
    a, b, g = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(g), -math.sin(g), 0], [math.sin(g), math.cos(g), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class KnownTransform:
    """A known smooth transform between a template and a query scan (see the module doc for the formulas).

    All points are world LPS mm, arrays ``(N, 3)``.

    Attributes:
        centre: ``c``, the centre of the rotation and scaling.
        angles_deg: rotation angles (about x, y, z; ``R = Rz Ry Rx``).
        scale: isotropic scale ``s``.
        translation: ``t`` (mm).
        amplitudes: ``a`` ``(3, K)``: mode amplitudes (mm) per displacement component.
        wavevectors: ``w`` ``(3, K, 3)`` (rad/mm).
        phases: ``phi`` ``(3, K)`` (rad).
    """

    centre: np.ndarray
    angles_deg: np.ndarray
    scale: float
    translation: np.ndarray
    amplitudes: np.ndarray = field(default_factory=lambda: np.zeros((3, 0)))
    wavevectors: np.ndarray = field(default_factory=lambda: np.zeros((3, 0, 3)))
    phases: np.ndarray = field(default_factory=lambda: np.zeros((3, 0)))

    @property
    def rotation(self) -> np.ndarray:
        return _rotation(np.deg2rad(self.angles_deg))

    def affine_forward(self, points) -> np.ndarray:
        """``G(p) = c + t + s R (p - c)``: template -> query, affine part."""
        p = np.asarray(points, dtype=np.float64)
        return self.centre + self.translation + self.scale * (p - self.centre) @ self.rotation.T

    def affine_inverse(self, points) -> np.ndarray:
        """``G^-1(y) = c + R^T (y - c - t) / s``."""
        y = np.asarray(points, dtype=np.float64)
        return self.centre + (y - self.centre - self.translation) @ self.rotation / self.scale

    def displacement(self, points) -> np.ndarray:
        """``u(x)`` ``(N, 3)`` mm at query points ``x`` ``(N, 3)``."""
        x = np.asarray(points, dtype=np.float64)
        u = np.zeros_like(x)
        for i in range(3):
            for k in range(self.amplitudes.shape[1]):
                u[:, i] += self.amplitudes[i, k] * np.sin(x @ self.wavevectors[i, k] + self.phases[i, k])
        return u

    def lipschitz_bound(self) -> float:
        """Upper bound of the Frobenius (hence spectral) norm of ``du/dx`` anywhere."""
        per_component = (np.abs(self.amplitudes) * np.linalg.norm(self.wavevectors, axis=2)).sum(axis=1)
        return float(np.linalg.norm(per_component))

    def displacement_bound(self) -> float:
        """Upper bound of ``|u(x)|`` anywhere (mm)."""
        return float(np.linalg.norm(np.abs(self.amplitudes).sum(axis=1)))

    def query_to_template(self, points) -> np.ndarray:
        """``T(x) = G^-1(x + u(x))``: the template point shown at query point ``x`` (what resampling uses)."""
        x = np.asarray(points, dtype=np.float64)
        return self.affine_inverse(x + self.displacement(x))

    def template_to_query(self, points, tol_mm: float = 1e-6, max_iter: int = 500) -> np.ndarray:
        """Ground truth ``T^-1(p)``: the query point showing template point ``p``.

        Solves ``x + u(x) = G(p)`` by ``x <- G(p) - u(x)`` (a contraction: ``|du/dx| < 1``) until every point
        moves less than ``tol_mm``.
        """
        target = self.affine_forward(points)
        x = target.copy()
        for _ in range(max_iter):
            new = target - self.displacement(x)
            step = np.abs(new - x).max() if len(x) else 0.0
            x = new
            if step < tol_mm:
                return x
        raise RuntimeError(
            f"the inverse did not converge (last step {step:.3g} mm; |du/dx| <= {self.lipschitz_bound():.3g})"
        )

    def describe(self) -> dict:
        wavelengths = 2 * np.pi / np.linalg.norm(self.wavevectors, axis=2) if self.amplitudes.size else np.zeros(0)
        return {
            "rotation_deg_xyz": [round(float(a), 3) for a in self.angles_deg],
            "scale": round(float(self.scale), 4),
            "translation_mm_lps": [round(float(t), 3) for t in self.translation],
            "centre_mm_lps": [round(float(c), 3) for c in self.centre],
            "elastic_bound_mm": round(self.displacement_bound(), 3),
            "elastic_modes_per_axis": int(self.amplitudes.shape[1]),
            "elastic_wavelengths_mm": [round(float(wavelengths.min()), 1), round(float(wavelengths.max()), 1)]
            if wavelengths.size
            else [],
            "elastic_gradient_bound": round(self.lipschitz_bound(), 3),
        }


def random_transform(
    seed: int,
    centre,
    max_rotation_deg: float = 10.0,
    scale_range=(0.9, 1.1),
    max_translation_mm: float = 20.0,
    elastic_mm: float = 5.0,
    wavelength_mm=(80.0, 160.0),
    n_modes: int = 4,
) -> KnownTransform:
    """Draw a :class:`KnownTransform` (see the module doc for the distributions).

    Raises:
        ValueError: the elastic part could fold (gradient bound >= 0.9): lower ``elastic_mm`` or raise the
            wavelengths.
    """
    rng = np.random.default_rng(seed)
    angles = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
    scale = float(rng.uniform(*scale_range))
    translation = rng.uniform(-max_translation_mm, max_translation_mm, 3)
    weights = rng.uniform(0.5, 1.0, (3, n_modes)) * rng.choice([-1.0, 1.0], (3, n_modes))
    amplitudes = weights / np.abs(weights).sum(axis=1, keepdims=True) * (elastic_mm / math.sqrt(3.0))
    directions = rng.normal(size=(3, n_modes, 3))
    directions /= np.linalg.norm(directions, axis=2, keepdims=True)
    wavelengths = rng.uniform(*wavelength_mm, (3, n_modes))
    wavevectors = directions * (2 * np.pi / wavelengths)[..., None]
    phases = rng.uniform(0, 2 * np.pi, (3, n_modes))
    tf = KnownTransform(np.asarray(centre, float), angles, scale, translation, amplitudes, wavevectors, phases)
    if tf.lipschitz_bound() >= 0.9:
        raise ValueError(
            f"elastic part too strong for its smoothness (|du/dx| bound {tf.lipschitz_bound():.2f} >= 0.9): "
            "lower elastic_mm or raise wavelength_mm"
        )
    return tf


def grid_centre_lps(image: MetaTensor) -> np.ndarray:
    """World (LPS) position of the centre of ``image``'s voxel grid (``(1, X, Y, Z)``, RAS affine)."""
    centre = (np.asarray(image.shape[1:], float) - 1.0) / 2.0
    return voxel_to_world(centre, image.affine)[0]


def _sample_volume(volume: torch.Tensor, voxels: np.ndarray, fill: float) -> np.ndarray:
    """Trilinear values of ``volume`` ``(X, Y, Z)`` at fractional voxel coordinates ``(N, 3)``; ``fill`` outside."""
    return sample_at_voxels(volume[None], torch.as_tensor(voxels), "bilinear", fill)[0].numpy()


def query_grid(image: MetaTensor, transform: KnownTransform) -> tuple[np.ndarray, np.ndarray]:
    """The query grid: ``(affine_lps (4, 4), shape (3,))``, with ``image``'s spacing and directions, covering
    ``G`` of the template's corner voxel centres widened by the elastic bound plus 1 mm on every side."""
    affine_lps = convert_affine(image.affine, "RAS", "LPS")
    shape = np.asarray(image.shape[1:])
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in shape])), dtype=float)
    mapped = transform.affine_forward(voxel_to_world(corners, affine_lps, affine_space="LPS"))
    margin = transform.displacement_bound() + 1.0
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
    idx = world_to_voxel((mapped[:, None, :] + margin * signs).reshape(-1, 3), affine_lps, affine_space="LPS")
    lo, hi = np.floor(idx.min(0)), np.ceil(idx.max(0))
    shift = np.eye(4)
    shift[:3, 3] = lo
    return affine_lps @ shift, (hi - lo + 1).astype(int)


def resample_query(image: MetaTensor, transform: KnownTransform, chunk_voxels: int = 2_000_000):
    """Apply ``transform`` to ``image`` (``(1, X, Y, Z)`` MetaTensor with a RAS affine, as :func:`load_scan` gives).

    Returns:
        ``(query, info)``: the query ``MetaTensor`` ``(1, X', Y', Z')`` float32 with a RAS affine (same spacing
        and directions as ``image``, origin and size covering the transformed template), and
        ``{"max_displacement_mm", "rms_displacement_mm"}`` of ``|u|`` over the query grid.
    """
    affine_lps = convert_affine(image.affine, "RAS", "LPS")
    q_affine_lps, q_shape = query_grid(image, transform)

    volume = image[0].as_tensor().float() if isinstance(image, MetaTensor) else torch.as_tensor(image[0]).float()
    fill = float(volume.min())
    out = np.empty(int(np.prod(q_shape)), dtype=np.float32)
    sq_sum, max_u = 0.0, 0.0
    for start in range(0, out.size, chunk_voxels):
        lin = np.arange(start, min(start + chunk_voxels, out.size))
        voxels = np.stack(np.unravel_index(lin, q_shape), axis=1).astype(np.float64)
        x = voxel_to_world(voxels, q_affine_lps, affine_space="LPS")
        u = transform.displacement(x)
        norms = np.linalg.norm(u, axis=1)
        sq_sum += float((norms**2).sum())
        max_u = max(max_u, float(norms.max()))
        p = transform.affine_inverse(x + u)
        out[start : start + len(lin)] = _sample_volume(volume, world_to_voxel(p, affine_lps, affine_space="LPS"), fill)
    query = MetaTensor(
        torch.from_numpy(out.reshape(q_shape))[None],
        affine=torch.as_tensor(convert_affine(q_affine_lps, "LPS", "RAS")),
        meta={"space": "RAS"},
    )
    return query, {"max_displacement_mm": max_u, "rms_displacement_mm": math.sqrt(sq_sum / out.size)}


def save_nifti(image: MetaTensor, path: str) -> str:
    """Write ``(1, X, Y, Z)`` with its RAS affine as NIfTI (read back by :func:`load_scan` with the same geometry)."""
    nib.save(nib.Nifti1Image(image[0].cpu().numpy().astype(np.float32), np.asarray(image.affine, np.float64)), path)
    return path


def sample_template_points(
    image: MetaTensor, num_points: int, seed: int, min_value: float = -300.0, border_mm: float = 10.0
) -> np.ndarray:
    """``num_points`` voxel centres (world LPS, ``(N, 3)``) with intensity > ``min_value``, >= ``border_mm`` from
    the grid border (measured along each voxel axis), drawn without replacement with ``seed`` (fewer if fewer
    qualify)."""
    data = image[0].cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image[0])
    spacing = np.linalg.norm(np.asarray(image.affine, float)[:3, :3], axis=0)
    mask = data > min_value
    for axis, (n, sp) in enumerate(zip(data.shape, spacing)):
        idx = np.arange(n) * sp
        keep = (idx >= border_mm) & (idx <= (n - 1) * sp - border_mm)
        shape = [1, 1, 1]
        shape[axis] = n
        mask &= keep.reshape(shape)
    candidates = np.argwhere(mask)
    if len(candidates) == 0:
        raise ValueError(f"no voxel has intensity > {min_value} and lies {border_mm} mm inside the border")
    rng = np.random.default_rng(seed)
    chosen = candidates[rng.choice(len(candidates), size=min(num_points, len(candidates)), replace=False)]
    return voxel_to_world(chosen.astype(np.float64), image.affine)


# -------------------------------------------------------------------------------------------------- embedding
def bundle_pipeline(bundle_root: str = BUNDLE):
    """The semantic_sam bundle's ``preprocessing`` and ``inferer``, parsed from its ``inference.json``."""
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_root, "configs", "inference.json"))
    parser["bundle_root"] = bundle_root
    return parser.get_parsed_content("preprocessing"), parser.get_parsed_content("inferer")


def embed(path: str, modality: str, network, preprocessing, inferer, device) -> dict:
    """``{head: MetaTensor (1, 128, d, h, w)}`` of the scan at ``path`` through the bundle pipeline."""
    image = preprocessing({"image": path, "modality": modality})["image"]
    return inferer(image[None].to(device), network)


def _parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off", "none", ""):
        return False
    raise ValueError(f"expected true/false, got {value!r}")


def _parse_heads(heads) -> tuple:
    names = [h.strip() for h in heads.split(",")] if isinstance(heads, str) else [str(h).strip() for h in heads]
    return tuple(h for h in HEAD_NAMES if h in names) if set(names) <= set(HEAD_NAMES) else tuple(names)


def _pair(value, name) -> tuple:
    if isinstance(value, str):
        value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
    value = tuple(float(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be two numbers, got {value}")
    return value


# ------------------------------------------------------------------------------------------------------- main
def main(
    image: str = DEFAULT_IMAGE,
    modality: str = "ct",
    ckpt: str | None = None,
    width: float = 0.25,
    heads="fine,coarse,semantic",
    num_points: int = 300,
    seed: int = 0,
    output: str | None = None,
    compare_random=True,
    max_rotation_deg: float = 10.0,
    scale_range="0.9,1.1",
    max_translation_mm: float = 20.0,
    elastic_mm: float = 5.0,
    wavelength_mm="80,160",
    min_hu: float = -300.0,
    border_mm: float = 10.0,
    batch_size: int = 256,
    device: str = "cpu",
):
    """Evaluate NN matching against a known random transform of ``image`` and print a Markdown table.

    Args:
        image: the template scan (any ITK-readable 3D file or DICOM folder).
        modality: ``ct`` or ``mr`` (the bundle's intensity normalisation).
        ckpt: a SAMv2Net state dict (the bundle's ``model.pt``); none: random weights only.
        width, heads: the network (``heads`` comma-separated).
        num_points: template points to match.
        seed: seeds the transform, the points and the random network.
        output: also write the table (``.md``) or all numbers (``.json``) there.
        compare_random: with ``ckpt``, also evaluate a random network of the same width/heads.
        max_rotation_deg, scale_range, max_translation_mm, elastic_mm, wavelength_mm: the transform's
            distributions (see the module doc).
        min_hu, border_mm: template points have intensity > ``min_hu`` and lie ``border_mm`` inside the scan.
        batch_size: points per NN matrix product.
        device: torch device for embedding and matching.
    """
    script = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "scripts/evaluate_known_transform.py"
    command = "python " + shlex.join([script, *sys.argv[1:]])
    dev = torch.device(device)
    head_names = _parse_heads(heads)
    compare_random = _parse_bool(compare_random)

    template = load_scan(image)
    spacing = np.linalg.norm(np.asarray(template.affine, float)[:3, :3], axis=0)
    tf = random_transform(
        seed,
        grid_centre_lps(template),
        max_rotation_deg=max_rotation_deg,
        scale_range=_pair(scale_range, "scale_range"),
        max_translation_mm=max_translation_mm,
        elastic_mm=elastic_mm,
        wavelength_mm=_pair(wavelength_mm, "wavelength_mm"),
    )
    t0 = time.perf_counter()
    query, disp = resample_query(template, tf)
    resample_s = time.perf_counter() - t0
    points = sample_template_points(template, num_points, seed, min_value=min_hu, border_mm=border_mm)
    truth = tf.template_to_query(points)

    preprocessing, inferer = bundle_pipeline()
    models = []
    if ckpt:
        models.append(("trained", ckpt))
    if not ckpt or compare_random:
        models.append(("random", None))

    rows = [{"model": "no matching (template position)", **summarize_errors(points, truth)}]
    with tempfile.TemporaryDirectory(prefix="samv2_eval_") as tmp:
        query_path = save_nifti(query, os.path.join(tmp, "query.nii"))
        q_shape = tuple(int(n) for n in query.shape[1:])
        del query
        for label, weights in models:
            torch.manual_seed(seed)
            net = SAMv2Net(width=width, heads=head_names)
            if weights:
                load_weights(net, weights)
            net = net.to(dev).eval()
            t0 = time.perf_counter()
            template_heads = embed(image, modality, net, preprocessing, inferer, dev)
            t1 = time.perf_counter()
            query_heads = embed(query_path, modality, net, preprocessing, inferer, dev)
            t2 = time.perf_counter()
            predicted, scores = match_nearest_neighbour(template_heads, query_heads, points, batch_size=batch_size)
            t3 = time.perf_counter()
            del template_heads, query_heads
            rows.append(
                {
                    "model": f"{label} (`{weights}`)" if weights else f"{label} weights (seed {seed})",
                    **summarize_errors(predicted, truth),
                    "mean_score": float(np.mean(scores)),
                    "embed_template_s": t1 - t0,
                    "embed_query_s": t2 - t1,
                    "match_s": t3 - t2,
                }
            )

    tf_info = tf.describe()
    header = [
        "# NN matching against a known random transform",
        "",
        f"- Command: `{command}`",
        f"- Template: `{image}` ({modality.upper()}, {tuple(template.shape[1:])} voxels at "
        f"{' x '.join(f'{s:.3g}' for s in spacing)} mm); query: {q_shape} voxels, "
        f"same spacing and directions; resampled in {resample_s:.1f} s",
        f"- Transform (seed {seed}; query point x -> template point G^-1(x + u(x)), G(p) = c + t + s R (p - c)): "
        f"rotation {tf_info['rotation_deg_xyz']} deg about LPS x/y/z (R = Rz Ry Rx, each U(+-{max_rotation_deg:g})), "
        f"scale {tf_info['scale']} (U{_pair(scale_range, 'scale_range')}), "
        f"translation {tf_info['translation_mm_lps']} mm "
        f"(U(+-{max_translation_mm:g})), elastic: {tf_info['elastic_modes_per_axis']} sine modes per axis, "
        f"wavelengths {tf_info['elastic_wavelengths_mm']} mm, |u| <= {tf_info['elastic_bound_mm']} mm "
        f"(realised max {disp['max_displacement_mm']:.2f}, RMS {disp['rms_displacement_mm']:.2f} mm), "
        f"|du/dx| <= {tf_info['elastic_gradient_bound']}",
        f"- Points: {len(points)} template voxel centres with intensity > {min_hu:g} and >= {border_mm:g} mm "
        f"inside the scan (seed {seed}); ground truth = exact inverse transform (fixed point, < 1e-6 mm); errors in LPS mm",
        f"- Network: SAMv2Net(width={width:g}, heads={list(head_names)}); bundle preprocessing and inferer of "
        f"`bundles/semantic_sam/configs/inference.json`; NN over the query fine grid with sub-voxel refinement",
        f"- Device: {dev.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads); "
        f"torch {torch.__version__}, monai {monai.__version__}; "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        "",
    ]
    table = [
        "| model | MED (mm) | MEDx | MEDy | MEDz | median | p90 | max | CPM@10mm (%) | mean score "
        "| embed template (s) | embed query (s) | match (s) |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        def fmt(key, spec=".2f"):
            return format(r[key], spec) if key in r else "-"

        table.append(
            f"| {r['model']} | {fmt('med')} | {fmt('med_x')} | {fmt('med_y')} | {fmt('med_z')} | {fmt('median')} | "
            f"{fmt('p90')} | {fmt('max')} | {fmt('cpm', '.1f')} | {fmt('mean_score', '.3f')} | "
            f"{fmt('embed_template_s', '.1f')} | {fmt('embed_query_s', '.1f')} | {fmt('match_s', '.2f')} |"
        )
    footer = [
        "",
        "MED: mean Euclidean error; MEDx/y/z: mean absolute error along LPS x/y/z; median, p90, max of the Euclidean "
        "error; CPM@10mm: % of points with error <= 10 mm; score: mean of per-head cosines at the match. "
        "Embedding times include the bundle preprocessing; random weights are a floor, not a result.",
    ]
    text = "\n".join(header + table + footer) + "\n"
    print(text, end="")
    if output:
        with open(output, "w", encoding="utf-8") as f:
            if output.endswith(".json"):
                record = {"command": command, "image": image, "seed": seed, "transform": tf_info}
                json.dump({**record, "displacement": disp, "rows": rows}, f, indent=2)
            else:
                f.write(text)
    return None


if __name__ == "__main__":
    fire.Fire(main)
