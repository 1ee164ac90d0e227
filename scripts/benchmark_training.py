"""Training throughput of the semantic_sam bundle: steps per hour under several settings, as a Markdown table.

Each row runs ``python -m monai.bundle run --config_file bundles/semantic_sam/configs/train.json`` in a fresh
process for ``--steps`` iterations (appearance and semantic steps as configured, data pipeline included) and reads
the throughput that the bundle's ``TrainingClock`` logs (from the first iteration on, so the dataset caching is
not counted). Rows: the default (channels_last, glibc malloc, as the bundle runs), jemalloc when installed,
channels_last off, one thread, the patch sampling and augmentation in a DataLoader worker process beside the
training step, and MONAI's ``ThreadDataLoader`` (the next batch prepared in a background thread).

Usage::

    python scripts/benchmark_training.py [--steps 40] [--datalist_file <datalist>] [--output table.md]
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "bundles", "semantic_sam", "configs", "train.json")
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
NO_CHANNELS_LAST = "$samv2_components.engines.HeadsModel(@network_def, channels_last=False).to(@device)"


def run_row(steps: int, threads: int, jemalloc: bool, overrides: list[str], datalist: str | None) -> float:
    """Steps per second of one training run in a fresh process."""
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
    found = re.findall(r"throughput: \d+ iterations in [\d.]+ s = ([\d.]+) steps/s", result.stdout + result.stderr)
    if result.returncode != 0 or not found:
        raise RuntimeError(f"training run failed (exit {result.returncode}): {(result.stderr or result.stdout)[-2000:]}")
    return float(found[-1])


def main(steps: int = 40, datalist_file: str | None = None, output: str | None = None) -> None:
    """Print (and write to ``output``) the throughput table; see the module docstring."""
    jemalloc = os.path.isfile(JEMALLOC)
    # the default is what `python -m monai.bundle run` gets: glibc malloc (jemalloc measured slower, 2026-12-05)
    rows = [
        ("default: channels_last, bf16 autocast, 2 threads, glibc malloc", 2, False, []),
        ("as default, jemalloc (LD_PRELOAD)", 2, True, []),
        ("as default, channels_last off", 2, False, ["--network", NO_CHANNELS_LAST]),
        ("as default, 1 thread", 1, False, []),
        ("as default, augmentation in 1 loader worker", 2, False, ["--num_workers", "1"]),
        ("as default, MONAI ThreadDataLoader (next batch prepared in a thread)", 2, False,
         ["--train_loader#_target_", "ThreadDataLoader"]),
    ]
    if not jemalloc:
        rows.pop(1)
    lines = [
        "# Semantic-SAM training throughput",
        "",
        f"- Command: `python {shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])}`",
        f"- {steps} iterations per row, each row a fresh process; datalist `{datalist_file or 'the shipped sample'}`; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        "",
        "| setting | s / step | steps / h |",
        "|:---|---:|---:|",
    ]
    for name, threads, use_jemalloc, overrides in rows:
        rate = run_row(steps, threads, use_jemalloc, overrides, datalist_file)
        lines.append(f"| {name} | {1.0 / rate:.2f} | {3600.0 * rate:.0f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    fire.Fire(main)
