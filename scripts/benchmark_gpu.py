"""One short command for a GPU machine: embedding pass times (full width and the light model) and training
steps per second, printed as Markdown (issue 20's GPU figures; the CPU figures come from the same scripts).

It runs, in order and each in fresh processes:

1. ``scripts/benchmark_embedding.py`` on ``--device`` for widths 1.0 and 0.25 (fp32 and bf16 rows, the bf16 ones
   with the bundles' float16 maps; the table ends with the light-vs-full-width speed-up);
2. ``scripts/benchmark_training.py``'s training run (``configs/train.json`` of semantic_sam, the bundle's own
   engine and data pipeline) for ``--train_steps`` iterations at each width, reading the throughput the bundle logs.

Sized for at most 5 minutes on one GPU (not yet run on one: no GPU was lent to the session that wrote it; on the
2-core CPU the embedding part alone takes about 4 minutes); ``--train_steps 0`` skips the training rows. Copy the repository with the 2 mm training data
(``bundles/semantic_sam/runs/data_2mm``, 32 MB, made by ``scripts/prepare_training_data.py --resample_mm 2``) and run::

    python scripts/benchmark_gpu.py --datalist_file bundles/semantic_sam/runs/data_2mm/datalist.json --output gpu.md

Smoke test on a CPU (what the test suite runs)::

    python scripts/benchmark_gpu.py --device cpu --size 32,64,64 --repeats 1 --train_steps 0
"""

from __future__ import annotations

import os
import sys

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling benchmark scripts

import fire
import torch

import benchmark_embedding
import benchmark_training


def main(
    device: str = "cuda",
    size: str = "160,192,192",
    repeats: int = 3,
    train_steps: int = 60,
    datalist_file: str | None = None,
    output: str | None = None,
) -> None:
    """Print (and write to ``output``) the embedding table and the training throughput rows.

    Args:
        device: ``cuda`` (the point of this command) or ``cpu`` (a smoke test).
        size: embedding input ``D,H,W`` (default 160,192,192, the CPU benchmark's volume).
        repeats: timed embedding passes per row (median reported).
        train_steps: training iterations per width (0: no training rows).
        datalist_file: training datalist (default: the bundle's shipped sample).
        output: also write the Markdown there.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("benchmark_gpu: --device cuda requested but CUDA is not available on this machine")
    benchmark_embedding.main(size=size, widths="1.0,0.25", repeats=repeats, device=device, output=output)
    if train_steps <= 0:
        return
    lines = ["", "## Training throughput (`configs/train.json`, bf16 autocast, batch 2)", "",
             "| width | s / step | steps / h |", "|---:|---:|---:|"]
    for width in (1.0, 0.25):
        rate = benchmark_training.run_row(int(train_steps), os.cpu_count() or 1, False,
                                          ["--network_def#width", str(width)], datalist_file)
        lines.append(f"| {width:g} | {1.0 / rate:.3f} | {3600.0 * rate:.0f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    if output:
        with open(output, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    fire.Fire(main)
