"""Training throughput of the semantic_sam bundle: steps per hour under several settings, as a Markdown table.

Each row runs ``python -m monai.bundle run --config_file bundles/semantic_sam/configs/train.json`` in a fresh
process for ``--steps`` iterations (appearance and semantic steps as configured, data pipeline included) and reads
the two throughputs that the bundle's ``TrainingClock`` logs: the whole run's (from the first iteration on, so the
dataset caching is not counted) and the steady one after its first 10 iterations (kernel creation for each input
shape and, with ``--compile true``, the network's compilation: costs paid once per run, which a long run does not
feel). Rows: the default (channels_last, glibc malloc keeping freed memory on its heap, as the bundle runs),
glibc's default heap policy (``--retain_freed_memory false``: large tensors mapped and unmapped, so faulted in again
every step), the network compiled with ``torch.compile``, jemalloc when installed, channels_last off, one thread, the patch sampling and augmentation in a
DataLoader worker process beside the training step, and MONAI's ``ThreadDataLoader`` (the next batch prepared in a
background thread).

Usage::

    python scripts/benchmark_training.py [--steps 60] [--datalist_file <datalist>] [--output table.md]
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile

import fire

from samv2_components.engines.clock import DEFAULT_WARMUP_ITERATIONS as WARMUP_ITERATIONS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "bundles", "semantic_sam", "configs", "train.json")
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
NO_CHANNELS_LAST = "$samv2_components.engines.HeadsModel(@network_def, channels_last=False).to(@device)"


def run_row(steps: int, threads: int, jemalloc: bool, overrides: list[str], datalist: str | None) -> tuple[float, float]:
    """Steps per second of one training run in a fresh process: the whole run's and the steady one."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("LD_PRELOAD", None)
    if jemalloc:
        env["LD_PRELOAD"] = JEMALLOC
    with tempfile.TemporaryDirectory(prefix="samv2_trainbench_") as out:
        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", TRAIN, "--output_dir", out,
                   "--num_steps", str(steps), "--log_every", str(steps), *overrides]
        if datalist:
            command += ["--datalist_file", datalist]
        result = subprocess.run(command, env=env, capture_output=True, text=True, encoding="utf-8")
    log = result.stdout + result.stderr
    whole = re.findall(r"(?<!steady )throughput: \d+ iterations in [\d.]+ s = ([\d.]+) steps/s", log)
    steady = re.findall(r"steady throughput: \d+ iterations after the first \d+ in [\d.]+ s = ([\d.]+) steps/s", log)
    if result.returncode != 0 or not whole or not steady:
        raise RuntimeError(f"training run failed (exit {result.returncode}): {(result.stderr or result.stdout)[-2000:]}")
    return float(whole[-1]), float(steady[-1])


def main(steps: int = 60, datalist_file: str | None = None, output: str | None = None) -> None:
    """Print (and write to ``output``) the throughput table; see the module docstring."""
    if int(steps) <= WARMUP_ITERATIONS:
        raise SystemExit(f"benchmark_training: --steps must be above the {WARMUP_ITERATIONS} warm-up iterations, got {steps}")
    jemalloc = os.path.isfile(JEMALLOC)
    # the default is what `python -m monai.bundle run` gets: glibc malloc, freed memory kept on its heap
    # (samv2_components.allocator.retain_freed_memory); jemalloc measured slower (2026-12-05)
    rows = [
        ("default: channels_last, bf16 autocast, 2 threads, glibc malloc, freed memory kept", 2, False, []),
        ("as default, glibc's default heap policy (`--retain_freed_memory false`)", 2, False,
         ["--retain_freed_memory", "false"]),
        ("as default, network compiled (`--compile true`)", 2, False, ["--compile", "true"]),
        ("as default, jemalloc (LD_PRELOAD)", 2, True, []),
        ("as default, channels_last off", 2, False, ["--network", NO_CHANNELS_LAST]),
        ("as default, 1 thread", 1, False, []),
        ("as default, augmentation in 1 loader worker", 2, False, ["--num_workers", "1"]),
        ("as default, MONAI ThreadDataLoader (next batch prepared in a thread)", 2, False,
         ["--train_loader#_target_", "ThreadDataLoader"]),
    ]
    if not jemalloc:
        rows = [row for row in rows if not row[2]]
    lines = [
        "# Semantic-SAM training throughput",
        "",
        f"- Command: `python {shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])}`",
        f"- {steps} iterations per row (steady: after the first {WARMUP_ITERATIONS}), each row a fresh process; datalist `{datalist_file or 'the shipped sample'}`; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        "",
        "| setting | s / step, steady | steps / h, steady | steps / h, whole run |",
        "|:---|---:|---:|---:|",
    ]
    for name, threads, use_jemalloc, overrides in rows:
        whole, steady = run_row(steps, threads, use_jemalloc, overrides, datalist_file)
        lines.append(f"| {name} | {1.0 / steady:.2f} | {3600.0 * steady:.0f} | {3600.0 * whole:.0f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    fire.Fire(main)
