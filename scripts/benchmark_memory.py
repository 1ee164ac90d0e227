"""Peak memory and time of ``samv2 embed``, ``samv2 match`` and ``samv2 register`` on a large CT, as a user runs them;
prints a table.

The scan is made from real anatomy: the shipped sample CT resampled (linear) onto a ``--size`` grid (X, Y, Z voxels,
default 512 x 512 x 600, a full-resolution chest-abdomen-pelvis CT) at ``--spacing`` mm (default 0.7 x 0.7 x 0.8),
written as an uncompressed int16 NIfTI (about 300 MB). Each command runs in its own process; its peak is that
process's peak resident memory (``ru_maxrss`` of the waited child), so the numbers include reading the file,
resampling it to 2 mm and everything the bundle holds. ``samv2 register`` runs twice: the large CT as the fixed scan
and the sample CT as the moving one (the same anatomy), and the README tour's CT-MR pair (3 mm phantom scans).

Reproduce the figures in ``bundles/semantic_sam/docs/README.md`` and ``bundles/crosssam_registration/docs/README.md``::

    python scripts/benchmark_memory.py --work_dir /tmp/samv2_memory
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire

from samv2_components.sample_data import sample_path


def make_large_ct(path: str, size=(512, 512, 600), spacing=(0.7, 0.7, 0.8)) -> str:
    """Resample the sample CT onto a ``size`` grid of ``spacing`` mm centred on it; write int16 NIfTI to ``path``."""
    import SimpleITK as sitk

    ct = sitk.ReadImage(sample_path("ct_abdomen"), sitk.sitkFloat32)
    centre = ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in ct.GetSize()])
    grid = sitk.Image([int(s) for s in size], sitk.sitkInt16)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetDirection(ct.GetDirection())
    half = [(n - 1) * sp / 2.0 for n, sp in zip(size, spacing)]
    direction = [ct.GetDirection()[i * 3: i * 3 + 3] for i in range(3)]
    grid.SetOrigin([centre[r] - sum(direction[r][c] * half[c] for c in range(3)) for r in range(3)])
    large = sitk.Resample(ct, grid, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    sitk.WriteImage(large, path, False)
    return path


def measure(command: list[str]) -> tuple[float, float, int]:
    """Run ``command``; return (wall seconds, peak RSS of that process in MiB, exit status)."""
    import tempfile

    with tempfile.TemporaryFile(mode="w+") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        _, wait_status, usage = os.wait4(process.pid, 0)  # this child's own resource usage
        wall = time.perf_counter() - start
        status = os.waitstatus_to_exitcode(wait_status)
        process.returncode = status
        if status != 0:
            log.seek(0)
            sys.stderr.write(log.read()[-2000:])
    return wall, usage.ru_maxrss / 1024.0, status  # ru_maxrss is KiB on Linux


def _elastix_build() -> str:
    """Which elastix the ``auto`` backend picks in a fresh process, with the SimpleITK version."""
    import SimpleITK

    from samv2_components.registration.deformable import require_elastix

    try:
        backend = require_elastix("auto")
    except Exception as exc:  # noqa: BLE001 - reported, the register rows then fail with their own message
        return f"none ({exc})"
    return f"{backend} (SimpleITK {SimpleITK.Version_VersionString()})"


def main(work_dir: str = "samv2_memory", size: str = "512,512,600", spacing: str = "0.7,0.7,0.8",
         register: bool = True) -> None:
    """Make the large CT in ``work_dir`` and print the table (one row per command); ``register``: also the two
    ``samv2 register`` rows (a few minutes more)."""
    os.makedirs(work_dir, exist_ok=True)
    size_xyz = [int(v) for v in str(size).strip("()[] ").split(",")]
    spacing_xyz = [float(v) for v in str(spacing).strip("()[] ").split(",")]
    scan = os.path.join(work_dir, "large_ct.nii")
    if not os.path.exists(scan):
        make_large_ct(scan, size_xyz, spacing_xyz)
    cli = [sys.executable, "-m", "samv2_components.cli"]
    rows = [
        ("embed", cli + ["embed", "--input_path", scan, "--output_dir", os.path.join(work_dir, "embed")]),
        ("match (8 points, template = sample CT)", cli + [
            "match", "--template", sample_path("ct_abdomen"), "--points", sample_path("ct_abdomen_points"),
            "--query", scan, "--output_dir", os.path.join(work_dir, "match")]),
    ]
    if register:
        rows += [
            ("register (fixed = large CT, moving = sample CT, CT-CT)", cli + [
                "register", "--fixed", scan, "--fixed_modality", "ct", "--moving", sample_path("ct_abdomen"),
                "--moving_modality", "ct", "--output_dir", os.path.join(work_dir, "register_large")]),
            ("register (the README tour's CT-MR pair, 3 mm)", cli + [
                "register", "--fixed", sample_path("phantom_ct"), "--fixed_modality", "ct", "--moving",
                sample_path("phantom_mr"), "--moving_modality", "mr", "--output_dir",
                os.path.join(work_dir, "register_tour")]),
        ]
    print(f"large CT: {'x'.join(map(str, size_xyz))} voxels at {'x'.join(map(str, spacing_xyz))} mm "
          f"({os.path.getsize(scan) / 2**20:.0f} MiB on disk); threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    if register:  # the deformable stage's memory depends on which elastix runs it (crosssam_registration docs, 0.11.0)
        print(f"elastix for samv2 register's deformable stage: {_elastix_build()}")
    print("| command | wall (s) | peak RSS (MiB) | exit |")
    print("|---|---|---|---|")
    for name, command in rows:
        wall, peak, status = measure(command)
        print(f"| {name} | {wall:.1f} | {peak:.0f} | {status} |")


if __name__ == "__main__":
    fire.Fire(main)
