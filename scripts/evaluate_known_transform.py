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

The transform and the query scan come from :mod:`samv2_components.transforms.known_transform`; embedding through
:class:`samv2_components.inference.BundlePipeline`.

Timings are wall-clock seconds on the machine that ran it (preprocessing + embedding per scan; NN matching of all
points); the table states the device. Random weights (``--ckpt`` not given, or the ``random`` row of
``--compare_random``) are a floor, not a result: a random network is drawn with ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire
import monai
import numpy as np
import torch

from samv2_components.inference import BundlePipeline
from samv2_components.io.image import load_scan
from samv2_components.matching import match_nearest_neighbour
from samv2_components.metrics import summarize_errors
from samv2_components.networks import HEAD_NAMES, SAMv2Net
from samv2_components.transforms.known_transform import (
    grid_centre_lps,
    random_transform,
    resample_query,
    sample_template_points,
    save_nifti,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundles", "semantic_sam")
DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))  # the shared data next to the checkout
DEFAULT_IMAGE = os.path.join(DATA, "body_ct", "lung2_image.nrrd")


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
            pipe = BundlePipeline(BUNDLE, ckpt=weights, device=dev, network=SAMv2Net(width=width, heads=head_names))
            t0 = time.perf_counter()
            template_heads = pipe.embed(image, modality)
            t1 = time.perf_counter()
            query_heads = pipe.embed(query_path, modality)
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
