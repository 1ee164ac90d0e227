"""CT–MR rigid registration benchmark on the porcine phantom pair: SAMv2 CrossSAM/AdaReg (the
``crosssam_registration`` bundle) against SimpleITK, elastix and ANTs rigid registration, on the same cases.
Prints Markdown tables (and writes them with ``--output``), a per-case CSV and a box plot (paper Fig. 7 style).

Data: ``../shared/data/ct_mr_phantom`` next to the checkout (TCIA MRI-DIR porcine phantom; CT and T2 MR in
different frames of reference, never registered, different fields of view). Convention everywhere: a transform is a 4x4 matrix (or an
ITK transform) mapping **fixed** (CT) physical points, LPS mm, to **moving** (MR) physical points.

1. **Reference transform** (:func:`samv2_components.registration.benchmark_reference.derive_reference`; no ground
   truth exists). Multi-start Mattes-MI rigid registration of the MR (moving) to the CT (fixed) with SimpleITK: one start per axis-aligned orientation (the 24
   rotations of the cube, which include the head-to-foot reversals), each around the body-mask centroids (the MR
   centroid is mapped onto the CT centroid); Euler3D optimised with RegularStepGradientDescent on a 2-level
   pyramid of the 3 mm scans. Every result is scored by the same full-sampling Mattes MI on the 2 mm scans; the
   best few are refined on the 2 mm scans and the best refined one is refined once more at the finest level (CT
   1 mm, native MR). Reported: the metric of every start, the spread (mean distance over the CT body) between the
   best solution and the other refined solutions that reached about the same metric, and a fiducial check: the
   gold markers of the CT (> 2500 HU components of the 1 mm CT, merged within 6 mm) are mapped into the native MR
   and the nearest signal void (the darkest spot of a difference-of-Gaussians within ``search_mm``) is located;
   the residuals are compared with the same search from random body points (a void is found anywhere in this
   heterogeneous tissue: residuals are only informative when clearly below the random-point ones).
   The result is cached as JSON (``--reference`` reuses it).
2. **Cases** (:func:`samv2_components.registration.benchmark_cases.make_cases`): a random rigid offset ``D`` in
   the MR frame (rotation about a random axis, angle uniform in ±``max_rotation_deg``, about the MR body centroid; translation uniform in ±``max_translation_mm`` per
   axis) and a random crop of the MR body extent along one or two axes (50–80 % kept). The case's moving image is
   ``M_case(y) = MR(D^-1(y))`` on an axis-aligned 2 mm grid covering the cropped region, so its true
   fixed -> moving transform is ``T_case = D ∘ T_ref`` (a CT point p shows in the MR at ``T_ref(p)``, which the
   offset moves to ``D(T_ref(p))``). Two case sets (``--orientations``), same random offsets and crops:
   ``acquired`` (the MR as acquired: the reference rotates by ~180 deg, the MR lies head-to-foot reversed relative
   to the CT) and ``aligned`` (``D`` also undoes that reversal with the nearest axis-aligned rotation, so the
   headers agree up to the random offset, the situation of scans in consistent patient coordinates). Two more
   (:func:`~samv2_components.registration.benchmark_cases.make_case_set`): ``slab`` (aligned, the MR cut to an
   axial slab of 30-60 mm instead of the crop: the paper's small-FOV case) and ``hard`` (aligned, offsets up to
   45 deg and 80 mm, a 30-60 mm slab).
3. **Methods** (:mod:`samv2_components.registration.benchmark_methods`; each returns a fixed -> moving 4x4 LPS
   matrix, or a reported failure, and its wall time):
   AdaReg rigid through the bundle's ``configs/inference.json`` (preprocessing, network, weights, inferer,
   ``adareg``; time = embedding both scans + rigid fit; a reported failure counts as a failure and is scored with
   the identity transform), SimpleITK rigid (:func:`~samv2_components.registration.register_intensity`), elastix
   rigid (itk-elastix default ``rigid`` parameter map, warmed up once outside the timing), ANTs rigid (antspyx in
   a separate virtual environment, through ``scripts/_ants_rigid.py``; skipped with the reason when unavailable).
4. **Metrics**: TRE of a case = mean over points p of ``|T_est(p) - T_case(p)|``, points on a ``--tre_spacing``
   grid inside the CT body (HU > -300, largest component) that ``T_case`` maps inside the moving image's field of
   view. Per method: mean ± std, median, success rate (TRE < ``success_mm``), mean wall time.

Example (the full run, 20 cases in each of the two sets, about 15-20 minutes on 2 CPU cores: ~2 min for the reference,
~35 s per case pair; see ``--help``)::

    python3 -m venv .venv-ants && .venv-ants/bin/pip install --only-binary :all: antspyx   # once, for the ANTs row
    OMP_NUM_THREADS=2 python scripts/benchmark_registration.py --output bundles/crosssam_registration/docs/benchmark_registration.md

It writes the Markdown, ``<output stem>_reference.json`` (reused on the next run), ``<output stem>_cases.csv`` and
``docs/benchmark_boxplot.png`` (MR as acquired) / ``docs/benchmark_boxplot_aligned.png``.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire
import numpy as np
import SimpleITK as sitk

from samv2_components.registration.benchmark_cases import CASE_SETS, Case, make_case_set
from samv2_components.registration.benchmark_methods import (
    IDENTITY,
    AdaRegMethod,
    AntsMethod,
    ConfirmingAdaRegMethod,
    ElastixMethod,
    SAMv2PipelineMethod,
    SearchingAdaRegMethod,
    SimpleITKMethod,
    UncheckedAdaRegMethod,
    ants_available,
    method_stats,
    run_cases,
)
from samv2_components.registration.benchmark_reference import load_or_derive_reference, phantom_files
from samv2_components.visualize import write_boxplot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundles", "crosssam_registration")
DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "ct_mr_phantom"))  # the shared data next to the checkout
ANTS_PYTHON = os.path.join(REPO, ".venv-ants", "bin", "python")
ANTS_HELPER = os.path.join(REPO, "scripts", "_ants_rigid.py")


# ------------------------------------------------------------------------------------------------ main
def _reference_lines(ref: dict, path: str | None) -> list[str]:
    fid = ref.get("fiducial_check", {})
    spread = ref.get("spread_mm_within_2pct_metric", {})
    starts = sorted(ref.get("starts", []), key=lambda s: s["metric_2mm"])
    lines = [
        "## 1. Reference transform (CT -> MR; no ground truth exists)",
        "",
        f"- Method: {ref['method']}.",
        f"- Result: rotation {ref['rotation_deg']} deg, translation {ref['translation_mm']} mm (LPS), Mattes MI "
        f"{ref['metric_2mm']} (2 mm scans, all CT voxels in the body); derived in {ref.get('wall_time_s', '-')} s"
        + (f"; cached in `{os.path.relpath(path, REPO) if path.startswith(REPO) else path}`" if path else "") + ".",
    ]
    if len(starts) > 1:
        lines.append(
            f"- Starts: best start MI {starts[0]['metric_2mm']}, second basin MI {next((s['metric_2mm'] for s in starts if s['distance_to_best_mm'] > 10), '-')}; "
            f"{sum(s['distance_to_best_mm'] <= 10 for s in starts)} of {len(starts)} starts ended within 10 mm of the answer."
        )
    if spread:
        lines.append(
            f"- Consistency: {spread.get('n')} refined solutions (top starts and restarts from the answer perturbed by "
            f"10 deg / 10 mm) reached MI within 2 % of the best; their mean distance to the answer over the CT body "
            f"{spread.get('mean')} mm, max {spread.get('max')} mm; the finest-level refinement moved it by "
            f"{ref.get('fine_refinement_shift_mm', '-')} mm."
        )
    if fid.get("possible"):
        verdict = "conclusive" if fid.get("conclusive") else "inconclusive: no better than random body points"
        lines.append(
            f"- Fiducial check ({verdict}): {fid['n_fiducials']} CT markers (> 2500 HU) detected, {fid['n_inside_mr_fov']} inside "
            f"the MR FOV; distance from each mapped marker to the darkest MR spot within {fid['search_mm']} mm: median "
            f"{fid['residual_mm_median']} mm (darkness {fid['darkness_median']}) vs {fid['random_points_residual_mm_median']} mm "
            f"(darkness {fid['random_points_darkness_median']}) from random body points: the markers' voids cannot be told "
            f"apart from the tissue's other dark spots in this T2 scan, so they do not verify the reference."
            if not fid.get("conclusive") else
            f"- Fiducial check: {fid['n_fiducials']} CT markers, median residual {fid['residual_mm_median']} mm vs "
            f"{fid['random_points_residual_mm_median']} mm for random body points."
        )
    else:
        lines.append(f"- Fiducial check not possible: {fid.get('reason', 'not run')}.")
    return lines + [""]


ORIENTATIONS = CASE_SETS  # the case sets, by name


def _result_lines(title: str, cases: list[Case], rows: list[dict], method_names: list[str], skipped: dict,
                  success_mm: float) -> list[str]:
    by_method = {m: [r for r in rows if r["method"] == m] for m in method_names}
    lines = [
        title,
        "",
        f"| method | cases | success TRE < {success_mm:g} mm (%) | TRE of successes, mean (mm) | TRE mean ± std (mm) | median (mm) | max (mm) | reported failures | wrong transforms written | mean wall time (s) |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, v in by_method.items():
        s = method_stats(v, success_mm)
        wall = "-" if s["wall"] is None else f"{s['wall']:.1f}"
        succ = "-" if m == IDENTITY else f"{s['success']:.0f}"
        hits = "-" if m == IDENTITY or not np.isfinite(s["success_mean"]) else f"{s['success_mean']:.1f}"
        wrong = "-" if m == IDENTITY else str(s["wrong_written"])
        lines.append(f"| {m} | {s['n']} | {succ} | {hits} | {s['mean']:.1f} ± {s['std']:.1f} | {s['median']:.1f} | {s['max']:.1f} | "
                     f"{s['reported_failures']} | {wrong} | {wall} |")
    for name, why in skipped.items():
        lines.append(f"| {name} | skipped: {why} | | | | | | | | |")
    lines += [
        "",
        "| case | offset rotation (deg) | offset translation (mm, LPS) | crop (kept fraction of body extent) | TRE points | "
        + " | ".join(method_names) + " |",
        "|:---|---:|:---|:---|---:|" + "---:|" * len(method_names),
    ]
    for c in cases:
        cells = []
        for m in method_names:
            r = next(r for r in by_method[m] if r["case"] == c.name)
            cells.append(f"{r['tre_mm']:.1f}" + (" (failed)" if r["failed"] else ""))
        lines.append(f"| {c.name} | {c.info['rotation_deg']} | {c.info['translation_mm']} | "
                     f"{', '.join(f'{k} {v}' for k, v in c.info['crop_keep'].items())} | {len(c.points)} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(
    num_cases: int = 20,
    seed: int = 0,
    reference: str | None = None,
    output: str | None = None,
    csv_path: str | None = None,
    boxplot: str = os.path.join(BUNDLE, "docs", "benchmark_boxplot.png"),
    work_dir: str | None = None,
    methods: str = "adareg_search,adareg,adareg_unchecked,simpleitk,elastix,ants",
    orientations: str = "acquired,aligned",
    threads: int = 2,
    ckpt: str | None = None,
    device: str = "cpu",
    tre_spacing: float = 8.0,
    success_mm: float = 10.0,
    ants_python: str = ANTS_PYTHON,
    dump_dir: str | None = None,
):
    """Run the benchmark (module docstring) and print the Markdown tables.

    Args:
        num_cases: random cases (offset + crop of the MR) per orientation set.
        seed: seeds the cases (and the reference's restarts).
        reference: reference-transform JSON: reused if it exists, else derived and written there (default: next
            to ``output`` as ``<output stem>_reference.json``, else ``benchmark_registration_reference.json`` next
            to ``boxplot``).
        output: also write the Markdown there.
        csv_path: per-case CSV (default: next to ``output`` as ``<output stem>_cases.csv``, else
            ``benchmark_registration_cases.csv`` next to ``boxplot``).
        boxplot: the box-plot PNG of the first orientation set; other sets get ``<stem>_<set>.png``.
        work_dir: where the case images go (default: a temporary folder, deleted at the end).
        methods: comma-separated subset of ``samv2_pipeline`` (the bundle default: candidates, MI refinement,
            selection), ``adareg_search`` (AdaReg with orientation search auto, the 0.3 default),
            ``adareg_confirm`` (auto, and a marginal header fit must win a search too),
            ``adareg`` (headers trusted), ``adareg_unchecked`` (diagnostic), ``simpleitk``, ``elastix``, ``ants``.
        orientations: comma-separated case sets: ``native`` (the pair as it comes, one case: D = identity, no
            crop), ``acquired`` (the MR as acquired with random offsets and crops: T_case = D @ T_ref),
            ``aligned`` (D also undoes the reference's axis-aligned head-to-foot reversal; same random offsets),
            ``slab`` (aligned, cut to a 30-60 mm axial slab) and/or ``hard`` (aligned, offsets up to 45 deg and
            80 mm, a 30-60 mm slab).
        threads: threads of every method (torch, ITK/SimpleITK, elastix, ANTs).
        ckpt: AdaReg weights (default: the bundle's ``models/model.pt``).
        device: torch device of the embedding network.
        tre_spacing: grid spacing (mm) of the TRE points in the CT body.
        success_mm: a case succeeds when its TRE is below this.
        ants_python: the Python of the ANTs environment.
        dump_dir: also write one JSON per case and SAMv2 method there: the method's record (the pipeline's
            refined candidates with their scores) with every candidate's TRE, the case's truth and TRE points, for
            studying the selection rules offline (on validation seeds, never the test cases).
    """
    import torch

    torch.set_num_threads(int(threads))
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    command = "python " + shlex.join([os.path.relpath(sys.argv[0]) if sys.argv else "scripts/benchmark_registration.py", *sys.argv[1:]])
    # fire turns "a,b" into a tuple: accept both
    methods = ",".join(methods) if isinstance(methods, (list, tuple)) else methods
    orientations = ",".join(orientations) if isinstance(orientations, (list, tuple)) else orientations
    sets = [o.strip().lower() for o in str(orientations).replace(" ", "").split(",") if o.strip()]
    if not sets or any(o not in ORIENTATIONS for o in sets):
        raise ValueError(f"orientations must be a comma-separated subset of {', '.join(ORIENTATIONS)}, got {orientations!r}")
    temp_dir = None
    if work_dir is None:
        work_dir = temp_dir = tempfile.mkdtemp(prefix="samv2_regbench_")
    os.makedirs(work_dir, exist_ok=True)
    stem = os.path.splitext(output)[0] if output else os.path.join(os.path.dirname(os.path.abspath(boxplot)), "benchmark_registration")
    reference = reference or f"{stem}_reference.json"
    csv_path = csv_path or f"{stem}_cases.csv"
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    try:
        ref = load_or_derive_reference(reference, log=log, seed=seed, **phantom_files(DATA))
        T_ref = np.asarray(ref["fixed_to_moving"], dtype=np.float64)
        case_sets = {}
        for o in sets:
            log(f"drawing {1 if o == 'native' else num_cases} '{o}' case(s) into {work_dir} ...")
            case_sets[o] = make_case_set(o, num_cases, seed, T_ref, work_dir, f"{DATA}/ct_2mm.nii.gz",
                                         f"{DATA}/mr_t2_2mm.nii.gz", tre_spacing_mm=tre_spacing)

        wanted = [m.strip().lower() for m in str(methods).replace(" ", "").split(",") if m.strip()]
        runners, skipped = [], {}
        for key in wanted:
            if key == "samv2_pipeline":
                runners.append(SAMv2PipelineMethod(BUNDLE, ckpt=ckpt, device=device))
            elif key == "adareg_search":
                runners.append(SearchingAdaRegMethod(BUNDLE, ckpt=ckpt, device=device))
            elif key == "adareg_confirm":
                runners.append(ConfirmingAdaRegMethod(BUNDLE, ckpt=ckpt, device=device))
            elif key == "adareg":
                runners.append(AdaRegMethod(BUNDLE, ckpt=ckpt, device=device))
            elif key == "adareg_unchecked":
                runners.append(UncheckedAdaRegMethod(BUNDLE, ckpt=ckpt, device=device))
            elif key == "simpleitk":
                runners.append(SimpleITKMethod())
            elif key == "elastix":
                try:
                    runners.append(ElastixMethod(threads))
                except ImportError as exc:
                    skipped["elastix rigid"] = f"itk-elastix not installed ({exc})"
            elif key == "ants":
                why = ants_available(ants_python)
                if why:
                    skipped[AntsMethod.name] = why
                else:
                    runners.append(AntsMethod(ants_python, ANTS_HELPER, threads))
            else:
                raise ValueError(f"unknown method {key!r}")
        first = next(iter(case_sets.values()))[0]
        for runner in runners:
            log(f"{runner.name}: warm-up ...")
            runner.warm_up(first)

        method_names = [IDENTITY] + [r.name for r in runners]
        rel = lambda p: os.path.relpath(p, REPO) if os.path.abspath(p).startswith(REPO) else p  # noqa: E731
        all_rows, result_lines, plots = [], [], []
        for k, (o, cases) in enumerate(case_sets.items()):
            rows = run_cases(cases, runners, success_mm, log=log, dump_dir=dump_dir)
            for r in rows:
                r["set"] = o
            all_rows += rows
            png = boxplot if k == 0 else f"{os.path.splitext(boxplot)[0]}_{o}.png"
            write_boxplot(png, {m: [r["tre_mm"] for r in rows if r["method"] == m] for m in method_names if m != IDENTITY},
                          threshold_mm=success_mm, title=f"CT-MR rigid, phantom, MR {o}: TRE of {len(cases)} cases",
                          failed={m: [r["failed"] for r in rows if r["method"] == m] for m in method_names})
            plots.append(png)
            result_lines += _result_lines(f"## {k + 2}. Results, MR {o}: {ORIENTATIONS[o]}", cases, rows, method_names,
                                          skipped, success_mm)

        info = {c.name: c for cases in case_sets.values() for c in cases}
        os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["set", "case", "method", "tre_mm", "success", "reported_failure", "wall_s", "offset_rotation_deg",
                        "offset_translation_mm", "crop_keep", "n_points", "note"])
            for r in all_rows:
                c = info[r["case"]]
                w.writerow([r["set"], r["case"], r["method"], f"{r['tre_mm']:.3f}", "" if r["success"] is None else int(r["success"]),
                            int(r["failed"]), "" if r["wall_s"] is None else f"{r['wall_s']:.2f}", c.info["rotation_deg"],
                            " ".join(map(str, c.info["translation_mm"])), " ".join(f"{k}:{v}" for k, v in c.info["crop_keep"].items()),
                            len(c.points), r["reason"]])

        adareg = next((r for r in runners if isinstance(r, AdaRegMethod)), None)
        lines = [
            "# CT-MR rigid registration benchmark (porcine phantom)",
            "",
            f"- Command: `{command}` ({time.perf_counter() - t_start:.0f} s in all)",
            f"- Data: `{DATA}`: CT 2 mm (fixed) against the T2 MR 2 mm with a random rigid offset (up to 20 deg about a "
            f"random axis, up to 40 mm per axis) and a crop (50-80 % of the body extent kept along one or two axes) "
            f"(moving); {num_cases} cases per set, seed {seed}. The true fixed -> moving transform is T_case = D @ T_ref "
            f"(D: the offset; T_ref: section 1). TRE: mean distance between T_est(p) and T_case(p) over CT body points "
            f"(HU > -300) on a {tre_spacing:g} mm grid that T_case maps inside the moving image.",
            f"- {platform.processor() or platform.machine()}, {threads} threads per method, torch {torch.__version__}, "
            f"SimpleITK {sitk.Version.VersionString()}, {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        ]
        if adareg is not None:
            lines.append(f"- AdaReg: weights `{rel(adareg.ckpt)}`; " + ", ".join(f"{k}={v}" for k, v in adareg.settings.items()))
        lines += ["", *_reference_lines(ref, reference), *result_lines]
        lines += [
            "Notes:",
            "",
            "- A reported failure (AdaReg: the matches do not support a rigid transform) counts as a failure and is "
            "scored with the identity transform. Wall time: registration only (images already on disk); AdaReg includes "
            "embedding both scans (the CT once, its time added to every case); elastix after one warm-up call; ANTs "
            "inside its helper process (without the interpreter start and imports).",
            "- Per-case CSV: `" + rel(csv_path) + "`; box plots: " + ", ".join(f"`{rel(p)}`" for p in plots) + ".",
            "",
        ]
        text = "\n".join(lines)
        print(text)
        if output:
            os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
            with open(output, "w", encoding="utf-8") as f:
                f.write(text)
        return None
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    fire.Fire(main)
