"""The methods of the CT-MR rigid registration benchmark (``scripts/benchmark_registration.py``) and their run over
the cases (:mod:`~samv2_components.registration.benchmark_cases`).

Every method is a callable ``method(case) -> MethodResult`` with a ``name`` and a ``warm_up(case)``; its result is
a **fixed -> moving** 4x4 matrix (world LPS mm; the case's ``truth`` convention), or a reported failure, and its
wall time:

* :class:`AdaRegMethod` (and the variants with the orientation search): AdaReg rigid through the
  ``crosssam_registration`` bundle config; time = embedding both scans + rigid fit;
* :class:`SAMv2PipelineMethod`: the bundle default, the ``samv2`` pipeline (candidates from the embeddings and the
  headers, Mattes-MI refinement, selection with refusal); time = embedding both scans + the pipeline;
* :class:`SimpleITKMethod`: :func:`~samv2_components.registration.register_intensity` rigid (Mattes MI);
* :class:`ElastixMethod`: itk-elastix's default ``rigid`` parameter map (:func:`elastix_to_matrix`);
* :class:`AntsMethod`: antspyx rigid in a separate virtual environment, through a helper script
  (:func:`ants_rigid`).

:func:`run_cases` scores every method on every case by the TRE (mean distance between ``T_est(p)`` and
``T_case(p)`` over the case's points); a reported failure is scored with the identity. Needs SimpleITK.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from samv2_components.errors import SAMv2InputError
from samv2_components.inference import BundlePipeline
from samv2_components.registration.benchmark_cases import Case, sitk_transform_to_matrix, tre
from samv2_components.registration.intensity_baselines import register_intensity
from samv2_components.registration.orientation import register_rigid_with_orientation_search

__all__ = [
    "IDENTITY",
    "AdaRegMethod",
    "AntsMethod",
    "ConfirmingAdaRegMethod",
    "ElastixMethod",
    "MethodResult",
    "SAMv2PipelineMethod",
    "SearchingAdaRegMethod",
    "SimpleITKMethod",
    "UncheckedAdaRegMethod",
    "ants_available",
    "ants_rigid",
    "elastix_to_matrix",
    "dump_case",
    "method_stats",
    "run_cases",
]

#: the method name of the "no registration" rows
IDENTITY = "identity (no registration)"


@dataclass
class MethodResult:
    """What a method gives for one case: the fixed -> moving 4x4 (LPS mm), its wall time (s), whether it reported
    a failure, and why (or a detail of the result)."""

    matrix: np.ndarray | None  # fixed -> moving, LPS; None when the method failed without a transform
    wall_s: float
    failed: bool = False  # the method reported a failure (or raised)
    reason: str = ""
    record: dict | None = None  # the method's own JSON-ready record of the case (the pipeline's summary), if any


class AdaRegMethod:
    """AdaReg rigid through the ``crosssam_registration`` bundle config at ``bundle_root`` (preprocessing, network
    + weights, inferer: :class:`~samv2_components.inference.BundlePipeline`; and ``adareg``). The fixed scan is
    embedded once; its embedding time is added to every case's wall time. ``orientation_search`` as the bundle's
    (``"off"``: trust the headers; ``"auto"``: the bundle default, search the 24 axis-aligned orientations of the
    moving scan when the headers give no consistent registration)."""

    name = "SAMv2 AdaReg rigid, headers trusted (orientation search off)"

    def __init__(self, bundle_root: str, ckpt: str | None = None, device: str = "cpu", orientation_search: str = "off",
                 confirm_below_fraction: float | None = None):
        self.pipeline = BundlePipeline(bundle_root, ckpt=ckpt, device=device)
        self.ckpt = self.pipeline.ckpt
        self.adareg = self.pipeline.parsed("adareg")
        self.orientation_search, self.confirm_below_fraction = orientation_search, confirm_below_fraction
        self.settings = self.pipeline.settings("adareg", exclude=("matcher",))
        self._fixed: dict[str, tuple] = {}

    def embed_image(self, image) -> dict:
        """``{head: MetaTensor (C, d, h, w)}`` of a preprocessed image."""
        return self.pipeline.embed_image(image)

    def embed(self, path: str, modality: str):
        """``(preprocessed image, heads, seconds)`` of the scan at ``path``."""
        t0 = time.perf_counter()
        image = self.pipeline.preprocess(path, modality)
        return image, self.embed_image(image), time.perf_counter() - t0

    def warm_up(self, case: Case):
        self.embed(case.moving_path, "mr")

    def __call__(self, case: Case) -> MethodResult:
        if case.fixed_path not in self._fixed:
            self._fixed[case.fixed_path] = self.embed(case.fixed_path, "ct")
        fixed_image, fixed_heads, fixed_s = self._fixed[case.fixed_path]
        moving_image, moving_heads, moving_s = self.embed(case.moving_path, "mr")
        t0 = time.perf_counter()
        result = self._rigid(fixed_image, fixed_heads, moving_image, moving_heads)
        wall = fixed_s + moving_s + time.perf_counter() - t0
        detail = self._detail(result.summary)
        if "orientation_search" in result.summary:
            detail += f", orientation search {result.summary['orientation_search']['seconds']} s"
        if not result.success:
            return MethodResult(None, wall, True, f"{result.reason} ({detail})", record=result.summary)
        return MethodResult(np.asarray(result.fixed_to_moving, dtype=np.float64), wall, False, detail, record=result.summary)

    def _rigid(self, fixed_image, fixed_heads, moving_image, moving_heads):
        """The rigid stage this method benchmarks (a ``RigidRegistration``)."""
        return register_rigid_with_orientation_search(
            self.adareg, self.embed_image, fixed_image, fixed_heads, moving_image, moving_heads, mode=self.orientation_search,
            confirm_below_fraction=self.confirm_below_fraction,
        )

    @staticmethod
    def _detail(summary: dict) -> str:
        return f"inliers {summary.get('n_inliers', '-')}/{summary.get('n_matches_above_score', '-')}"


class SearchingAdaRegMethod(AdaRegMethod):
    """AdaReg as the bundle ran it by default until 0.4 (``pipeline: adareg``): the orientation search when the headers give no consistent
    registration."""

    name = "SAMv2 AdaReg rigid, orientation search auto (the 0.3 bundle default; now pipeline adareg)"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, orientation_search="auto", **kwargs)


class ConfirmingAdaRegMethod(AdaRegMethod):
    """Orientation search ``auto`` that also searches when the header fit is marginal (inlier fraction below
    ``confirm_below_fraction``): the header orientation must then win the search."""

    name = "SAMv2 AdaReg rigid, orientation search auto + confirm marginal header fits (< 15 % inliers)"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, orientation_search="auto", confirm_below_fraction=0.15, **kwargs)


class UncheckedAdaRegMethod(AdaRegMethod):
    """Diagnostic: AdaReg with its confidence checks off (any inlier fraction and residual, 6 inliers suffice), to
    show how far the embedding matches alone get when the bundle would rather report a failure."""

    name = "AdaReg rigid, confidence checks off (diagnostic)"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.adareg.min_inlier_fraction, self.adareg.max_rms_residual_mm, self.adareg.min_inliers = 0.0, 1e9, 6


class SAMv2PipelineMethod(AdaRegMethod):
    """The bundle default: :class:`~samv2_components.registration.pipeline.SAMv2RigidPipeline` as configured in
    the bundle's ``samv2_pipeline`` (with its ``orientation_search``)."""

    name = "SAMv2 pipeline rigid (bundle default: candidates + MI refinement + selection)"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.samv2 = self.pipeline.parsed("samv2_pipeline")

    def _rigid(self, fixed_image, fixed_heads, moving_image, moving_heads):
        return self.samv2.rigid(fixed_image, fixed_heads, moving_image, moving_heads, embed=self.embed_image)

    @staticmethod
    def _detail(summary: dict) -> str:
        return f"winner {summary.get('winner', '-')}, support {summary.get('support', '-')}, MI {summary.get('mi', '-')}"


class SimpleITKMethod:
    name = "SimpleITK rigid (Mattes MI)"

    def warm_up(self, case: Case):
        pass

    def __call__(self, case: Case) -> MethodResult:
        t0 = time.perf_counter()
        try:
            res = register_intensity(case.fixed_path, case.moving_path, transform="rigid", seed=0)
        except SAMv2InputError as exc:
            return MethodResult(None, time.perf_counter() - t0, True, str(exc))
        return MethodResult(sitk_transform_to_matrix(res.transform), res.wall_time_s)


def elastix_to_matrix(parameter_map) -> np.ndarray:
    """Fixed -> moving 4x4 of an elastix ``EulerTransform`` parameter map (ITK Euler3D: ``R = Rz Rx Ry`` unless
    ``ComputeZYX``, about ``CenterOfRotationPoint``)."""
    get = lambda key: [float(v) for v in parameter_map[key]]  # noqa: E731
    kind = str(parameter_map["Transform"][0])
    if kind != "EulerTransform":
        raise ValueError(f"expected an elastix EulerTransform, got {kind}")
    rx, ry, rz, tx, ty, tz = get("TransformParameters")
    euler = sitk.Euler3DTransform()
    euler.SetCenter(get("CenterOfRotationPoint"))
    zyx = "ComputeZYX" in parameter_map and str(parameter_map["ComputeZYX"][0]).lower() == "true"
    euler.SetComputeZYX(zyx)
    euler.SetRotation(rx, ry, rz)
    euler.SetTranslation((tx, ty, tz))
    return sitk_transform_to_matrix(euler)


class ElastixMethod:
    name = "elastix rigid (default map, Mattes MI)"

    def __init__(self, threads: int = 2):
        import itk

        self.itk, self.threads = itk, int(threads)
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(self.threads)

    def _run(self, fixed_path: str, moving_path: str):
        itk = self.itk
        fixed = itk.imread(fixed_path, itk.F)
        moving = itk.imread(moving_path, itk.F)
        params = itk.ParameterObject.New()
        params.AddParameterMap(params.GetDefaultParameterMap("rigid"))
        with tempfile.TemporaryDirectory(prefix="samv2_elastix_") as log_dir:
            t0 = time.perf_counter()
            try:
                _, result = itk.elastix_registration_method(
                    fixed, moving, parameter_object=params, log_to_file=True, output_directory=log_dir,
                    number_of_threads=self.threads,
                )
            except RuntimeError as exc:  # the reason is in elastix's log, not in the exception
                reason = str(exc).strip().splitlines()[-1]
                for name in os.listdir(log_dir):
                    if name.endswith(".log"):
                        with open(os.path.join(log_dir, name), encoding="utf-8", errors="replace") as f:
                            found = [ln.split("ITK ERROR:")[-1].strip() for ln in f if "Description:" in ln]
                        reason = found[-1] if found else reason
                raise RuntimeError(reason) from exc
            wall = time.perf_counter() - t0
        return elastix_to_matrix(result.GetParameterMap(0)), wall

    def warm_up(self, case: Case):  # ITK's lazy loading (~10 s) happens here, outside the timing
        try:
            self._run(case.fixed_path, case.fixed_path)
        except Exception:  # noqa: BLE001 - only the loading matters
            pass

    def __call__(self, case: Case) -> MethodResult:
        t0 = time.perf_counter()
        try:
            matrix, wall = self._run(case.fixed_path, case.moving_path)
        except RuntimeError as exc:  # e.g. too many samples outside the moving image (FOV difference)
            return MethodResult(None, time.perf_counter() - t0, True, f"elastix stopped: {str(exc)[:160]}")
        return MethodResult(matrix, wall)


def ants_rigid(fixed_path: str, moving_path: str, python: str, helper: str, threads: int = 2, seed: int = 0,
               timeout: float = 600.0) -> dict:
    """Run the ANTs helper script ``helper`` (``scripts/_ants_rigid.py``) with ``python`` (the ANTs environment:
    antspyx pins numpy, so it lives outside this one); returns its JSON (``fixed_to_moving`` 4x4 LPS mm,
    ``wall_time_s``)."""
    with tempfile.TemporaryDirectory(prefix="samv2_ants_") as tmp:
        out = os.path.join(tmp, "result.json")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads)}
        proc = subprocess.run(
            [python, helper, fixed_path, moving_path, out, "--threads", str(threads), "--seed", str(seed)],
            capture_output=True, text=True, timeout=timeout, env=env,
        )
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"ANTs helper failed (rc {proc.returncode}): {tail[0][:200]}")
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def ants_available(python: str) -> str:
    """Empty string when ``python`` can import ants, else the reason."""
    if not os.path.exists(python):
        return f"no ANTs environment at {python} (python3 -m venv .venv-ants && .venv-ants/bin/pip install antspyx)"
    proc = subprocess.run([python, "-c", "import ants"], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return "antspyx does not import: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
    return ""


class AntsMethod:
    name = "ANTs rigid (antspyx)"

    def __init__(self, python: str, helper: str, threads: int = 2):
        self.python, self.helper, self.threads = python, helper, int(threads)

    def warm_up(self, case: Case):
        pass

    def __call__(self, case: Case) -> MethodResult:
        t0 = time.perf_counter()
        try:
            out = ants_rigid(case.fixed_path, case.moving_path, self.python, self.helper, self.threads)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            return MethodResult(None, time.perf_counter() - t0, True, str(exc))
        return MethodResult(np.asarray(out["fixed_to_moving"], dtype=np.float64), float(out["wall_time_s"]))


def method_stats(rows: list[dict], success_mm: float) -> dict:
    """The figures of one method on one case set, from rows with ``tre_mm`` (mm), ``wall_s`` (s or None) and
    ``failed`` (a reported failure, i.e. a refusal): ``n``, ``success`` (% with TRE below ``success_mm``),
    ``success_mean`` (mean TRE of those), ``wrong_written`` (TRE at or above ``success_mm`` and not refused: what a
    refusal exists to prevent), ``reported_failures``, the TRE's ``mean``, ``std``, ``median``, ``max`` and the mean
    ``wall`` time (None without times)."""
    t = np.array([float(r["tre_mm"]) for r in rows], dtype=np.float64)
    w = np.array([float(r["wall_s"]) for r in rows if r["wall_s"] is not None], dtype=np.float64)
    failed = np.array([bool(r["failed"]) for r in rows], dtype=bool)
    hit = t < success_mm
    nan = float("nan")
    return {
        "n": len(rows),
        "success": 100.0 * float(np.mean(hit)) if len(t) else nan,
        "success_mean": float(np.mean(t[hit])) if hit.any() else nan,
        "wrong_written": int(np.sum(~hit & ~failed)),
        "reported_failures": int(failed.sum()),
        "mean": float(np.mean(t)) if len(t) else nan,
        "std": float(np.std(t)) if len(t) else nan,
        "median": float(np.median(t)) if len(t) else nan,
        "max": float(np.max(t)) if len(t) else nan,
        "wall": float(np.mean(w)) if len(w) else None,
    }


def run_cases(cases: list[Case], runners: list, success_mm: float, log=print, dump_dir: str | None = None) -> list[dict]:
    """Every method on every case: rows ``{case, method, tre_mm, success, failed, wall_s, reason}`` (plus the
    identity as "no registration"). ``dump_dir``: also write each case's record of the methods that keep one
    (:func:`dump_case`)."""
    rows = [{"case": c.name, "method": IDENTITY, "tre_mm": tre(np.eye(4), c.truth, c.points), "success": None,
             "failed": False, "wall_s": None, "reason": ""} for c in cases]
    for runner in runners:
        log(f"{runner.name}:")
        for case in cases:
            res = runner(case)
            estimate = res.matrix if res.matrix is not None else np.eye(4)  # a reported failure: identity
            error = tre(estimate, case.truth, case.points)
            rows.append({"case": case.name, "method": runner.name, "tre_mm": error, "success": error < success_mm,
                         "failed": res.failed, "wall_s": res.wall_s, "reason": res.reason})
            log(f"  {case.name}: TRE {error:8.2f} mm, {res.wall_s:6.1f} s{' FAILED: ' + res.reason if res.failed else ''}")
            if dump_dir and res.record is not None:
                dump_case(os.path.join(dump_dir, f"{case.name}__{type(runner).__name__}.json"), case, runner.name, res, error)
    return rows


def dump_case(path: str, case: Case, method: str, result: MethodResult, tre_mm: float) -> None:
    """Write one case's record for offline study of the selection rules: the method's record (the pipeline's
    ``summary``, every refined candidate under ``candidates.candidates``) with each candidate's TRE added
    (``tre_mm``), the case's truth (``T_case``, fixed -> moving, LPS mm) and its TRE points (CT, LPS mm)."""
    record = json.loads(json.dumps(result.record, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    for c in (record.get("candidates") or {}).get("candidates", []):
        c["tre_mm"] = round(tre(np.asarray(c["fixed_to_moving"], dtype=np.float64), case.truth, case.points), 3)
    out = {"case": case.name, "method": method, "tre_mm": round(tre_mm, 3), "failed": result.failed,
           "reason": result.reason, "info": case.info, "truth": np.asarray(case.truth).tolist(),
           "points": np.round(np.asarray(case.points), 2).tolist(), "record": record}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, default=str)
