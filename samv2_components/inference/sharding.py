"""Cohort-scale inference under ``torchrun``: every rank takes its share of the scans, one summary at the end.

Used by the bundles' ``configs/multi_gpu_inference.json`` (layered on ``configs/inference.json``)::

    torchrun --nproc_per_node=4 -m monai.bundle run \\
        --config_file "['configs/inference.json','configs/multi_gpu_inference.json']" --input_path "scans/*.nii.gz"

* :func:`rank_share` splits the datalist as MONAI's ``partition_dataset`` does without shuffling (rank ``r`` of
  ``n`` takes entries ``r, r + n, r + 2n, ...``: no entry twice, none left out, shares differing by at most one);
  a rank with nothing to do (more ranks than scans, which ``partition_dataset`` refuses) runs nothing and still
  takes part in the summary.
* :func:`run_share` runs the rank's own evaluator; an error on one of its scans is caught and reported, so the
  other ranks' outputs are complete (each case folder is written atomically, as in a single-process run). The
  ranks then exchange what they did; rank 0 prints every finished result folder on stdout (in datalist order),
  writes ``<output_dir>/run_summary.json`` (written atomically) and names each failed scan on stderr. A rank whose
  share failed then re-raises its error, so the run's exit status says so.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from samv2_components.errors import find_samv2_error
from samv2_components.io.atomic import atomic_file

__all__ = ["rank_share", "run_share", "SUMMARY_FILE"]

SUMMARY_FILE = "run_summary.json"


def _rank_and_size() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_share(datalist: Sequence[Mapping[str, Any]]) -> list[dict]:
    """This rank's entries of ``datalist`` (all of them without a process group)."""
    rank, size = _rank_and_size()
    data = [dict(d) for d in datalist]
    if size == 1:
        return data
    for i, d in enumerate(data):
        d["_index"] = i  # the datalist order, for the summary
    return data[rank::size]  # partition_dataset(shuffle=False, even_divisible=False), also with more ranks than data


def run_share(run: Callable[[], Any], share: Sequence[Mapping[str, Any]], folders: Sequence[str], output_dir: str) -> None:
    """Run this rank's share (``run()``; nothing when ``share`` is empty), then gather and report (module doc).

    Args:
        run: runs the evaluator over this rank's share.
        share: this rank's datalist entries (``{"image": path, ...}``).
        folders: the result folder of each entry of ``share`` (same order).
        output_dir: where ``run_summary.json`` goes.
    """
    import torch.distributed as dist

    rank, size = _rank_and_size()
    error: BaseException | None = None
    if share:
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - reported in the summary; re-raised below
            error = exc
    found = find_samv2_error(error) if error is not None else None
    message = None if error is None else str(found or f"{type(error).__name__}: {error}")
    done = [os.path.isdir(f) for f in folders]
    record = {
        "rank": rank,
        "scans": [
            {"index": d.get("_index", i), "image": str(d["image"]), "folder": f, "done": ok}
            for i, (d, f, ok) in enumerate(zip(share, folders, done))
        ],
        "error": message,
    }
    records = [record]
    if size > 1:
        records = [None] * size
        dist.all_gather_object(records, record)
    if rank == 0:
        _report(records, output_dir)
    if size > 1:
        dist.barrier()
    if error is not None:
        raise error


def _report(records: Sequence[Mapping[str, Any]], output_dir: str) -> None:
    scans = sorted((s for r in records for s in r["scans"]), key=lambda s: s["index"])
    for s in scans:
        if s["done"]:
            sys.stdout.write(f"{s['folder']}\n")
    sys.stdout.flush()
    failed = [r for r in records if r["error"]]
    for r in failed:
        sys.stderr.write(f"ERROR: rank {r['rank']}: {r['error']}\n")
    summary = {
        "ranks": len(records),
        "scans": len(scans),
        "done": sum(s["done"] for s in scans),
        "failed_ranks": [{"rank": r["rank"], "error": r["error"],
                          "unfinished": [s["image"] for s in r["scans"] if not s["done"]]} for r in failed],
        "results": [{"image": s["image"], "folder": s["folder"], "done": s["done"], "rank": r["rank"]}
                    for r in records for s in r["scans"]],
    }
    os.makedirs(output_dir, exist_ok=True)
    with atomic_file(os.path.join(output_dir, SUMMARY_FILE)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
