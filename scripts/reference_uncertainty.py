"""How far the registration benchmark's reference can be trusted on a slab: the phantom pair's slab-local optima.

The benchmark (``scripts/benchmark_registration.py``) measures every method against one rigid CT -> MR reference
fitted on the whole phantom scans. Its ``slab`` and ``hard`` sets cut the MR to a 30-60 mm axial slab; a method
registering such a slab can at best find the slab's own optimum. This script registers each axial slab of the CT
body alone against the whole MR (:func:`~samv2_components.registration.benchmark_reference.slab_optima`: Mattes
MI, the reference and perturbed starts) and prints, per slab, how far its optimum lies from the reference and how
precisely the starts agree on it. Optionally (``--deformable_grids``) it also fits whole-scan elastix B-spline
references (Mattes MI, CT body, started at the rigid reference) and says how far they lie from the rigid one and
from each slab's optimum: a second, equally defensible reference.

Convention: LPS mm; matrices and fields map CT (fixed) points to MR (moving) points. Data: the 2 mm phantom scans
of ``../shared/data/ct_mr_phantom`` next to the checkout.

    python scripts/reference_uncertainty.py --output bundles/crosssam_registration/docs/reference_uncertainty.md
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

import fire
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundles", "crosssam_registration")
DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "ct_mr_phantom"))
REFERENCE = os.path.join(BUNDLE, "docs", "benchmark_registration_reference.json")
POINT_SPACING_MM = 6.0  # the CT body grid the distances are averaged over


def _grids(value) -> list[float]:
    # fire turns "60,40" into a tuple and "60" into an int: accept all
    items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
    return [float(v) for v in items]


def main(
    ct: str = os.path.join(DATA, "ct_2mm.nii.gz"),
    mr: str = os.path.join(DATA, "mr_t2_2mm.nii.gz"),
    reference: str = REFERENCE,
    thickness_mm: float = 40.0,
    step_mm: float = 20.0,
    starts: int = 5,
    deformable_grids="60,40",
    bending_penalty: float = 20.0,
    threads: int = 1,
    seed: int = 0,
    output: str | None = None,
) -> None:
    """Print the per-slab table (Markdown; module docstring) and write it to ``output``.

    Args:
        ct, mr: the fixed and moving scans (the benchmark's 2 mm phantom pair).
        reference: the benchmark's reference JSON (``fixed_to_moving``, 4x4 LPS mm).
        thickness_mm, step_mm: slab thickness and spacing along LPS z.
        starts: registrations per slab (the reference and ``starts - 1`` perturbations of 5 deg / 5 mm).
        deformable_grids: comma-separated B-spline control-point spacings (mm) of whole-scan deformable
            references to compare; empty for none (they need itk-elastix or SimpleITK-SimpleElastix).
        bending_penalty: elastix bending-energy weight of those references.
        threads: ITK threads.
        seed: sampling and perturbation seed.
        output: also write the Markdown there.
    """
    import SimpleITK as sitk

    from samv2_components.errors import SAMv2InputError
    from samv2_components.geometry import apply_matrix
    from samv2_components.registration.benchmark_cases import body_grid_points, ct_body_mask, read_float
    from samv2_components.registration.benchmark_reference import slab_optima
    from samv2_components.registration.deformable import refine_deformable

    command = "python " + shlex.join([os.path.relpath(sys.argv[0]) if sys.argv else "scripts/reference_uncertainty.py", *sys.argv[1:]])
    for path in (ct, mr, reference):
        if not os.path.exists(path):
            print(f"ERROR: {path}: no such file", file=sys.stderr)
            raise SystemExit(2)
    try:
        with open(reference, encoding="utf-8") as f:
            T_ref = np.asarray(json.load(f)["fixed_to_moving"], dtype=np.float64)
        if T_ref.shape != (4, 4):
            raise ValueError(f"fixed_to_moving has shape {T_ref.shape}, not 4x4")
    except (ValueError, KeyError) as exc:
        print(f"ERROR: {reference}: not a reference JSON with a 4x4 fixed_to_moving ({exc})", file=sys.stderr)
        raise SystemExit(2) from None
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    fixed, moving = read_float(ct), read_float(mr)
    grids = _grids(deformable_grids)
    t0 = time.perf_counter()
    rows = slab_optima(fixed, moving, T_ref, thickness_mm=thickness_mm, step_mm=step_mm, starts=starts,
                       point_spacing_mm=POINT_SPACING_MM, seed=seed)
    slab_s = time.perf_counter() - t0

    deformable = {}  # grid -> fixed -> moving point map
    for grid in grids:
        try:
            result = refine_deformable(fixed, moving, T_ref, fixed_mask=ct_body_mask(fixed), grid_spacing_mm=grid,
                                       iterations=300, resolutions=3, bending_penalty=bending_penalty,
                                       number_of_threads=int(threads), seed=seed, number_of_samples=8192)
        except SAMv2InputError as exc:
            print(f"ERROR: deformable reference (grid {grid:g} mm): {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        transform = result.transform
        deformable[grid] = lambda p, t=transform: np.array([t.TransformPoint([float(v) for v in q]) for q in p])

    header = ["slab z (LPS mm)", "points", "optimum to reference (mm)", "spread of starts (mm)",
              "shift at centre (LPS mm)", "MI reference -> optimum"]
    for grid in grids:
        header += [f"B-spline {grid:g} mm to reference (mm)", f"optimum to B-spline {grid:g} mm (mm)"]
    lines = [
        "# The benchmark reference on slabs: each axial slab's own optimum",
        "",
        f"- Command: `{command}`",
        f"- Scans: `{os.path.relpath(ct, REPO)}` (fixed) and `{os.path.relpath(mr, REPO)}` (moving); reference "
        f"`{os.path.relpath(reference, REPO)}`; slabs {thickness_mm:g} mm every {step_mm:g} mm along LPS z; "
        f"{starts} starts per slab (the reference and perturbations of 5 deg / 5 mm); {threads} thread(s); "
        f"{slab_s:.0f} s for the slabs",
        f"- Distances: mean over the slab's CT body points ({POINT_SPACING_MM:g} mm grid), LPS mm. Mattes MI: lower is better.",
        "",
        "| " + " | ".join(header) + " |",
        "|:---|" + "---:|" * (len(header) - 1),
    ]
    for r in rows:
        points = r["points"]
        cells = [f"{r['z_mm'][0]:g} .. {r['z_mm'][1]:g}", str(len(points)), f"{r['to_reference_mm']:.2f}",
                 f"{r['start_spread_mm']:.2f}", " ".join(f"{v:+.1f}" for v in r["shift_mm"]),
                 f"{r['mi_reference']:.4f} -> {r['mi_optimum']:.4f}"]
        rigid, local = apply_matrix(T_ref, points), apply_matrix(r["optimum"], points)
        for grid in grids:
            warped = deformable[grid](points)
            cells += [f"{np.linalg.norm(warped - rigid, axis=1).mean():.2f}",
                      f"{np.linalg.norm(warped - local, axis=1).mean():.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    to_ref = np.array([r["to_reference_mm"] for r in rows])
    spread = np.array([r["start_spread_mm"] for r in rows])
    lines += [
        "",
        f"- Slab optimum to the reference: mean {to_ref.mean():.2f} mm, median {np.median(to_ref):.2f}, max "
        f"{to_ref.max():.2f}; {int((to_ref > 3.0).sum())} of {len(rows)} slabs farther than 3 mm. Spread of the "
        f"starts around each optimum: mean {spread.mean():.2f} mm.",
    ]
    points_all = body_grid_points(fixed, POINT_SPACING_MM)
    for grid in grids:
        warped_all = deformable[grid](points_all)
        lines.append(f"- B-spline {grid:g} mm reference to the rigid one over the whole body: mean "
                     f"{np.linalg.norm(warped_all - apply_matrix(T_ref, points_all), axis=1).mean():.2f} mm.")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    fire.Fire(main)
