"""Tests of :func:`samv2_components.registration.deformable.refine_deformable` (elastix B-spline) on a synthetic case.

The fixed image is a sum of smooth Gaussian blobs on an anisotropic grid with a non-identity direction (as a NIfTI
stored in RAS order reads in ITK). The known fixed -> moving mapping is ``G(x) = A(x + d(x))``: a smooth sinusoidal
displacement ``d`` of 3-4 mm followed by a rigid ``A`` (4 degrees about S, ~8 mm shift) that is handed to the code
as ``initial_fixed_to_moving``. The moving image lives on its own grid with ``moving(G(x)) = 50 + 300 fixed(x)``
(another intensity scale, so the mutual information is exercised), made by inverting ``x + d(x)`` numerically.

Both wrappings of elastix are tested where installed (``backend``): itk-elastix (the ``registration`` extra) and
SimpleITK's own elastix filters (``SimpleITK-SimpleElastix``; the README's test command runs this file a second
time with that build of SimpleITK first on the path).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("itk")

from samv2_components.errors import SAMv2InputError  # noqa: E402
from samv2_components.registration import deformable as deformable_module  # noqa: E402
from samv2_components.registration.deformable import (  # noqa: E402
    DeformableResult,
    refine_deformable,
    require_elastix,
    write_displacement_field,
)

SIZE = (40, 44, 36)
SPACING = (2.0, 2.0, 2.5)
ORIGIN = (30.0, -60.0, 100.0)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
FAST = dict(grid_spacing_mm=20.0, resolutions=2, number_of_threads=1)
_INSTALLED = {  # SimpleITK's first: it cannot run in a process once itk-elastix's modules are loaded
    "simpleitk": deformable_module._simpleitk_has_elastix(),
    "itk-elastix": deformable_module._itk_elastix_installed(),
}
BACKENDS = [
    pytest.param(name, id=name, marks=pytest.mark.skipif(not found, reason=f"{name}'s elastix is not installed here"))
    for name, found in _INSTALLED.items()
]


def _grid_points(image) -> np.ndarray:
    """LPS points of all voxel centres, ``(N, 3)`` in SimpleITK array order (z slowest, x fastest)."""
    size = image.GetSize()
    zyx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in size[::-1]], indexing="ij"), -1)
    idx = zyx[..., ::-1].reshape(-1, 3)
    matrix = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())[None, :]
    return idx @ matrix.T + np.asarray(image.GetOrigin())


def _image(values: np.ndarray, like) -> "sitk.Image":
    out = sitk.GetImageFromArray(values.reshape(like.GetSize()[::-1]).astype(np.float32))
    out.CopyInformation(like)
    return out


class Case:
    def __init__(self):
        grid = sitk.Image(list(SIZE), sitk.sitkFloat32)
        grid.SetSpacing(SPACING)
        grid.SetOrigin(ORIGIN)
        grid.SetDirection(DIRECTION)
        self.centre = np.array(grid.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in SIZE]))
        rng = np.random.default_rng(7)
        extent = np.asarray(SIZE) * np.asarray(SPACING)
        n = 60
        self.mu = self.centre + (rng.random((n, 3)) - 0.5) * extent * 0.9
        self.sigma = rng.uniform(3.0, 7.0, n)
        self.amp = rng.uniform(0.3, 1.0, n) * rng.choice([-1.0, 1.0], n)
        angle = np.deg2rad(4.0)
        rot = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
        self.A = np.eye(4)
        self.A[:3, :3] = rot
        self.A[:3, 3] = self.centre - rot @ self.centre + np.array([6.0, -4.0, 5.0])
        self.fixed = _image(self.f(_grid_points(grid)), grid)
        # moving grid: identity direction, 2 mm, covering G(fixed box) with a margin
        corners = np.array(
            [grid.TransformIndexToPhysicalPoint([c * (s - 1) for c, s in zip(b, SIZE)]) for b in np.ndindex(2, 2, 2)]
        )
        moved = corners @ self.A[:3, :3].T + self.A[:3, 3]
        lo, hi = moved.min(0) - 10.0, moved.max(0) + 10.0
        mgrid = sitk.Image([int(v) for v in np.ceil((hi - lo) / 2.0) + 1], sitk.sitkFloat32)
        mgrid.SetSpacing((2.0, 2.0, 2.0))
        mgrid.SetOrigin(lo.tolist())
        self.moving = _image(50.0 + 300.0 * self.f(self.inverse(_grid_points(mgrid))), mgrid)
        # test points: voxel centres at least 8 voxels inside the fixed grid
        idx = np.argwhere(np.ones(SIZE, dtype=bool))
        inner = idx[np.all((idx >= 8) & (idx < np.asarray(SIZE) - 8), axis=1)][::37]
        self.points = np.array([grid.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in inner])

    def f(self, x: np.ndarray) -> np.ndarray:
        d2 = ((x[:, None, :] - self.mu[None]) ** 2).sum(-1)
        return (self.amp * np.exp(-d2 / (2.0 * self.sigma**2))).sum(-1)

    def d(self, x: np.ndarray) -> np.ndarray:
        y = x - self.centre
        w = 2.0 * np.pi / 70.0
        return np.stack([4.0 * np.sin(w * y[:, 1]), 3.0 * np.sin(w * y[:, 2] + 0.5), 3.0 * np.cos(w * y[:, 0])], -1)

    def rigid(self, x: np.ndarray) -> np.ndarray:
        return x @ self.A[:3, :3].T + self.A[:3, 3]

    def truth(self, x: np.ndarray) -> np.ndarray:
        """The known fixed -> moving mapping G(x) = A(x + d(x))."""
        return self.rigid(x + self.d(x))

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """G^-1(y): solve z + d(z) = A^-1 y by fixed-point iteration (|grad d| < 0.4, so it converges)."""
        target = (y - self.A[:3, 3]) @ np.linalg.inv(self.A[:3, :3]).T
        z = target.copy()
        for _ in range(60):
            z = target - self.d(z)
        assert np.abs(z + self.d(z) - target).max() < 1e-6
        return z


@pytest.fixture(scope="module")
def case() -> Case:
    return Case()


@pytest.fixture(scope="module", params=BACKENDS)
def run(case, tmp_path_factory, request):
    """One refinement with default metric and bending penalty, run from an empty working folder, per backend."""
    workdir = tmp_path_factory.mktemp("cwd")
    before_tmp = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("samv2_elastix_")}
    old = os.getcwd()
    os.chdir(workdir)
    try:
        result = refine_deformable(case.fixed, case.moving, case.A, iterations=200, backend=request.param, **FAST)
    finally:
        os.chdir(old)
    after_tmp = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("samv2_elastix_")}
    return result, sorted(os.listdir(workdir)), after_tmp - before_tmp


def test_points_match_known_mapping_better_than_rigid(case, run):
    result = run[0]
    truth = case.truth(case.points)
    err = np.linalg.norm(result.map_points(case.points) - truth, axis=1)
    rigid_err = np.linalg.norm(case.rigid(case.points) - truth, axis=1)
    assert len(case.points) > 300
    assert rigid_err.mean() > 3.0
    assert err.mean() < 1.5, f"deformable mean {err.mean():.2f} mm (rigid {rigid_err.mean():.2f})"
    assert np.percentile(err, 90) < 2.5


def test_resampled_moving_correlates_better_than_rigid(case, run):
    result = run[0]
    rigid = sitk.AffineTransform(case.A[:3, :3].flatten().tolist(), case.A[:3, 3].tolist())
    rigid_only = sitk.Resample(case.moving, case.fixed, rigid, sitk.sitkLinear, 50.0)
    fixed = sitk.GetArrayViewFromImage(case.fixed).ravel()
    corr = np.corrcoef(fixed, sitk.GetArrayViewFromImage(result.resampled_moving).ravel())[0, 1]
    corr_rigid = np.corrcoef(fixed, sitk.GetArrayViewFromImage(rigid_only).ravel())[0, 1]
    assert corr > 0.98 and corr > corr_rigid + 0.05, (corr, corr_rigid)
    for attr in ("GetSize", "GetOrigin", "GetSpacing", "GetDirection"):
        assert getattr(result.resampled_moving, attr)() == getattr(case.fixed, attr)()


def test_displacement_field_geometry_equals_fixed(case, run):
    field = run[0].displacement_field
    assert field.GetNumberOfComponentsPerPixel() == 3
    assert field.GetPixelID() == sitk.sitkVectorFloat64
    assert field.GetSize() == case.fixed.GetSize()
    assert field.GetOrigin() == case.fixed.GetOrigin()
    assert field.GetSpacing() == case.fixed.GetSpacing()
    assert field.GetDirection() == case.fixed.GetDirection()


def test_direction_convention(case, run):
    """Field and transform map FIXED points to MOVING points (incl. the rigid part), not the other way round."""
    result = run[0]
    field = sitk.GetArrayFromImage(result.displacement_field).reshape(-1, 3)  # (z, y, x) order, LPS vectors
    x = _grid_points(case.fixed)
    pick = np.random.default_rng(1).choice(len(x), 300, replace=False)
    mapped = result.map_points(x[pick])
    # the field is the complete mapping minus the identity, consistent with the transform
    np.testing.assert_allclose(x[pick] + field[pick], mapped, atol=1e-6)
    # ... and it is the fixed -> moving mapping G (not G^-1) at interior points
    inner = case.points
    assert np.linalg.norm(result.map_points(inner) - case.truth(inner), axis=1).mean() < 1.5
    assert np.linalg.norm(result.map_points(inner) - case.inverse(inner), axis=1).mean() > 8.0
    # outside the fixed grid the mapping falls back to the rigid initial transform
    far = np.array([[300.0, 300.0, 400.0]])
    np.testing.assert_allclose(result.map_points(far), case.rigid(far), atol=1e-6)


def test_no_files_left_and_provenance(run):
    result, cwd_files, tmp_left = run
    assert cwd_files == []
    assert tmp_left == set()
    assert isinstance(result, DeformableResult)
    text = result.elastix_parameters
    assert '(Transform "BSplineTransform")' in text and "(TransformParameters " in text
    assert "// InitialTransform AffineTransform" in text
    assert "(GridSpacing 20 20 20)" in text
    assert result.final_metric is not None and result.final_metric < 0
    assert result.wall_time_s > 0
    assert result.backend in ("itk-elastix", "simpleitk")


@pytest.mark.parametrize("backend", BACKENDS)
def test_initial_as_sitk_transform_and_seed_reproducible(case, backend):
    quick = dict(FAST, iterations=30, bending_penalty=None, backend=backend)
    from_matrix = refine_deformable(case.fixed, case.moving, case.A, seed=3, **quick)
    transform = sitk.AffineTransform(case.A[:3, :3].flatten().tolist(), case.A[:3, 3].tolist())
    from_sitk = refine_deformable(case.fixed, case.moving, transform, seed=3, **quick)
    other_seed = refine_deformable(case.fixed, case.moving, transform, seed=4, **quick)
    a, b, c = (sitk.GetArrayViewFromImage(r.displacement_field) for r in (from_matrix, from_sitk, other_seed))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    assert transform.GetParameters()[:9] == tuple(case.A[:3, :3].flatten())  # the caller's transform is untouched


@pytest.mark.parametrize("name", ["field.nii.gz", "field.mha"])
def test_write_displacement_field(run, tmp_path, name):
    result = run[0]
    path = tmp_path / "out" / name
    write_displacement_field(result, path)
    assert sorted(os.listdir(path.parent)) == [name]
    back = sitk.ReadImage(str(path))
    assert back.GetNumberOfComponentsPerPixel() == 3
    assert back.GetSize() == result.displacement_field.GetSize()
    np.testing.assert_allclose(back.GetOrigin(), result.displacement_field.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(back.GetSpacing(), result.displacement_field.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetDirection(), result.displacement_field.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(
        sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(result.displacement_field), atol=1e-5
    )
    with pytest.raises(SAMv2InputError):
        write_displacement_field(result, tmp_path / "field.png")


def test_bad_inputs(case):
    with pytest.raises(SAMv2InputError, match="metric"):
        refine_deformable(case.fixed, case.moving, case.A, metric="MeanSquares")
    with pytest.raises(SAMv2InputError, match="4x4"):
        refine_deformable(case.fixed, case.moving, np.eye(3))
    with pytest.raises(SAMv2InputError, match="grid_spacing_mm"):
        refine_deformable(case.fixed, case.moving, case.A, grid_spacing_mm=0)
    with pytest.raises(SAMv2InputError, match="backend"):
        refine_deformable(case.fixed, case.moving, case.A, backend="ants")
    far = np.eye(4)
    far[:3, 3] = 1000.0
    with pytest.raises(SAMv2InputError, match="outside the moving image"):
        refine_deformable(case.fixed, case.moving, far)


def test_require_elastix_checks_without_loading_itk_modules():
    """The workflow's early check finds an elastix wrapping without loading ITK's compiled modules (0.95 GB held for
    the rest of the process); they load only when the deformable stage runs."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from samv2_components.registration.deformable import require_elastix\n"
            "print(require_elastix('auto'))\n"
            "loaded = [m for m in sys.modules if m.startswith('itk.') and m.endswith('Python')]\n"
            "print(len(loaded))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    expected = "simpleitk" if _INSTALLED["simpleitk"] else "itk-elastix"
    assert result.stdout.split() == [expected, "0"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_with_the_bending_penalty_run_and_restore_the_default(backend):
    """itk-elastix's own ``SetNumberOfThreads`` with 2 threads and a multi-metric map (Mattes MI + bending penalty,
    the default) ends the process with a segmentation fault; the thread count is set as the library's process-wide
    default for the call instead, and the previous default comes back afterwards. In a subprocess, so that a crash
    fails this test instead of ending the test run."""
    import subprocess
    import sys

    threader = "itk.MultiThreaderBase" if backend == "itk-elastix" else "sitk.ProcessObject"
    code = ("import itk, numpy as np, SimpleITK as sitk\n"
            "from samv2_components.registration.deformable import refine_deformable\n"
            "rng = np.random.default_rng(0)\n"
            "noise = sitk.GetImageFromArray(rng.normal(size=(24, 28, 26)).astype(np.float32))\n"
            "image = sitk.SmoothingRecursiveGaussian(noise, 2.0)\n"
            "image.SetSpacing((2.0, 2.0, 2.5))\n"
            f"{threader}.SetGlobalDefaultNumberOfThreads(3)\n"
            "out = refine_deformable(image, image, np.eye(4), grid_spacing_mm=20.0, resolutions=1, iterations=20,\n"
            f"                        bending_penalty=1.0, number_of_threads=2, backend={backend!r})\n"
            f"print(out.displacement_field.GetSize(), {threader}.GetGlobalDefaultNumberOfThreads(), out.backend)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == f"(26, 28, 24) 3 {backend}"
    assert "Writing image" not in result.stdout  # SimpleITK's elastix prints it; samv2's stdout is the result folder


@pytest.mark.skipif(not all(_INSTALLED.values()), reason="needs both SimpleITK's elastix and itk-elastix")
def test_simpleitk_backend_refused_once_itk_modules_are_loaded():
    """SimpleITK's elastix aborts the process (std::bad_alloc) once itk-elastix's modules are loaded; "auto" then
    stays with itk-elastix and an explicit "simpleitk" is refused with one line. In a subprocess."""
    import subprocess
    import sys

    code = ("import itk\n"
            "itk.ElastixRegistrationMethod\n"
            "from samv2_components.registration.deformable import require_elastix\n"
            "print(require_elastix('auto'))\n"
            "require_elastix('simpleitk')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["itk-elastix"]
    assert "cannot run in a process that has already loaded itk-elastix's modules" in result.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_truth_on_a_real_scan_larger_fixed_field_of_view(backend):
    """The sample CT (3 mm, real anatomy) registered onto a crop of itself: the truth is the identity (up to a known
    shift), and the fixed scan reaches 18 mm past the moving one at each end (as AdaReg's fixed crop reaches past a
    small moving scan). A moving mask that drops the samples pushed past the moving scan's edge let the B-spline
    push ill-fitting samples out: 10.7 mm mean displacement (max 38); sampling only where the initial transform
    lands inside the moving scan, with edge values beyond it: about 1 mm (max 5). Onto itself: 1.0 -> 0.4 mm."""
    from samv2_components.sample_data import sample_path

    ct = sitk.Cast(sitk.ReadImage(sample_path("ct_abdomen")), sitk.sitkFloat32)
    size = ct.GetSize()
    # the crop also moved by a known shift t (its voxels keep their values, its origin moves): fixed -> moving is
    # x + t, the initial transform; the sampling mask mapped the other way would miss the moving scan entirely
    shift = np.array([30.0, -20.0, 40.0])
    crop = sitk.RegionOfInterest(ct, [size[0] - 20, size[1] - 20, size[2] - 12], [10, 10, 6])
    crop.SetOrigin((np.asarray(crop.GetOrigin()) + shift).tolist())
    settings = dict(grid_spacing_mm=30.0, iterations=200, resolutions=3)  # the bundle's settings
    for moving, t, mean_mm, max_mm in ((crop, shift, 2.0, 8.0), (ct, np.zeros(3), 0.7, 3.0)):
        initial = np.eye(4)
        initial[:3, 3] = t
        result = refine_deformable(ct, moving, initial, backend=backend, **settings)
        moved = np.linalg.norm(sitk.GetArrayFromImage(result.displacement_field) - t, axis=-1)
        assert moved.mean() < mean_mm and moved.max() < max_mm, (moving.GetSize(), moved.mean(), moved.max())


def test_both_wrappings_get_the_same_parameter_map():
    """One function adjusts elastix's default B-spline map for both wrappings; the control grid's schedule is stated
    (sqrt(2) per level, itk-elastix's default: SimpleITK's elastix defaults to 1.9881 / 1.41 / 1)."""
    pmap = {"Metric1Weight": ["1"], "GridSpacingSchedule": ["1.988100", "1.410000", "1.000000"]}
    deformable_module._configure_bspline_map(pmap, resolutions=3, grid_spacing_mm=30.0, iterations=200,
                                             number_of_samples=2048, seed=5, metric="AdvancedMattesMutualInformation",
                                             bending_penalty=None, air=-1000.0)
    assert pmap["GridSpacingSchedule"] == ["2.0", "1.4142135623730951", "1.0"]
    assert pmap["Metric"] == ["AdvancedMattesMutualInformation"] and "Metric1Weight" not in pmap
    assert pmap["RandomSeed"] == ["5"] and pmap["DefaultPixelValue"] == ["-1000.0"]
    deformable_module._configure_bspline_map(pmap, resolutions=1, grid_spacing_mm=30.0, iterations=200,
                                             number_of_samples=2048, seed=5, metric="AdvancedMattesMutualInformation",
                                             bending_penalty=2.0, air=0.0)
    assert pmap["GridSpacingSchedule"] == ["1.0"]
    assert pmap["Metric"] == ["AdvancedMattesMutualInformation", "TransformBendingEnergyPenalty"]
    assert pmap["Metric1Weight"] == ["2.0"]


def test_require_elastix_names_the_missing_package(monkeypatch):
    from samv2_components.errors import MissingExtraError

    monkeypatch.setattr(deformable_module, "_itk_elastix_installed", lambda: False)
    monkeypatch.setattr(deformable_module, "_simpleitk_has_elastix", lambda: False)
    with pytest.raises(MissingExtraError, match=r'itk-elastix: not installed .*pip install -e "\.\[registration\]"'):
        require_elastix("auto")
    with pytest.raises(MissingExtraError, match="itk-elastix: not installed"):
        require_elastix("itk-elastix")
    with pytest.raises(SAMv2InputError, match=r"SimpleITK-SimpleElastix: not installed .*pip install SimpleITK-SimpleElastix"):
        require_elastix("simpleitk")
    with pytest.raises(SAMv2InputError, match="backend: unknown value 'elastix'"):
        require_elastix("elastix")
    # "auto" prefers SimpleITK's filters (a few MB) to itk-elastix's modules (0.95 GB)
    monkeypatch.setattr(deformable_module, "_itk_elastix_installed", lambda: True)
    assert require_elastix("auto") == "itk-elastix"
    monkeypatch.setattr(deformable_module, "_simpleitk_has_elastix", lambda: True)
    monkeypatch.setattr(deformable_module, "_itk_elastix_loaded", lambda: False)
    assert require_elastix("auto") == "simpleitk" and require_elastix("itk-elastix") == "itk-elastix"
    # once itk-elastix's modules are loaded, SimpleITK's elastix would abort the process
    monkeypatch.setattr(deformable_module, "_itk_elastix_loaded", lambda: True)
    assert require_elastix("auto") == "itk-elastix"
    with pytest.raises(SAMv2InputError, match="backend: 'simpleitk' cannot run in a process"):
        require_elastix("simpleitk")


def test_working_grid_for_a_fixed_image_finer_than_field_spacing(case):
    """A fixed image finer than ``field_spacing_mm`` is registered on a coarser grid over its extent (same origin and
    direction): the field lives there, the resampled moving image on the fixed grid, and the mapping still recovers
    the known deformation; the default keeps a grid as coarse as 2 mm."""
    result = refine_deformable(case.fixed, case.moving, case.A, iterations=200, field_spacing_mm=4.0, **FAST)
    field = result.displacement_field
    assert field.GetSpacing() == (4.0, 4.0, 4.0)
    assert field.GetOrigin() == case.fixed.GetOrigin() and field.GetDirection() == case.fixed.GetDirection()
    last_fixed = (np.asarray(SIZE) - 1) * np.asarray(SPACING)
    last_field = (np.asarray(field.GetSize()) - 1) * 4.0
    assert np.all(last_field >= last_fixed) and np.all(last_field - 4.0 < last_fixed)  # covers it, no more
    for attr in ("GetSize", "GetOrigin", "GetSpacing", "GetDirection"):
        assert getattr(result.resampled_moving, attr)() == getattr(case.fixed, attr)()
    x = _grid_points(field)
    np.testing.assert_allclose(x + sitk.GetArrayFromImage(field).reshape(-1, 3), result.map_points(x), atol=1e-6)
    err = np.linalg.norm(result.map_points(case.points) - case.truth(case.points), axis=1)
    assert err.mean() < 1.5 and np.percentile(err, 90) < 2.5, err.mean()
    with pytest.raises(SAMv2InputError, match="field_spacing_mm"):
        refine_deformable(case.fixed, case.moving, case.A, field_spacing_mm=0.0)
