"""Mean training losses per window of iterations, read from a run's TensorBoard logs (the model card's numbers).

Usage::

    python scripts/training_losses.py bundles/semantic_sam/runs/campaign/tensorboard [--window 200]

Prints a Markdown table: iterations, then the mean of every logged loss term over the iterations of the window
where that term was computed (appearance steps log ``fine``/``coarse``, semantic steps ``semantic``).
"""

from __future__ import annotations

import glob
import os
from collections import defaultdict

import fire
import numpy as np


def read_scalars(log_dir: str) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of every scalar in the event files under ``log_dir`` (later files win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = defaultdict(dict)
    files = sorted(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True), key=os.path.getmtime)
    if not files:
        raise SystemExit(f"{log_dir}: no TensorBoard event files")
    for path in files:
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                scalars[tag][event.step] = event.value
    return scalars


def main(log_dir: str, window: int = 200) -> None:
    """Print the windowed means of every loss term (see the module docstring)."""
    scalars = read_scalars(log_dir)
    tags = sorted(t for t in scalars if t != "loss")
    last = max(max(v) for v in scalars.values())
    print("| iterations | " + " | ".join(tags) + " |")
    print("|---|" + "---:|" * len(tags))
    for start in range(1, last + 1, window):
        end = min(start + window - 1, last)
        cells = []
        for tag in tags:
            values = [v for s, v in scalars[tag].items() if start <= s <= end]
            cells.append(f"{np.mean(values):.3f} (n={len(values)})" if values else "-")
        print(f"| {start}-{end} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    fire.Fire(main)
