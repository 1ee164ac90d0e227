"""Benchmark the SAMv2 embedding pass (speed, peak memory, bf16 accuracy) and print a Markdown table.

What it measures: the network forward that the bundles run, i.e. ``SAMv2Inferer(...)(image, SAMv2Net(...))``
(all three heads), on one volume of 192 x 192 x 160 voxels (X x Y x Z at 2 mm; tensor ``(1, 1, 160, 192, 192)``
in (D, H, W)) by default. One row per network width times precision:

* ``fp32``: float32, contiguous memory layout;
* ``bf16``: bf16 autocast plus ``channels_last_3d`` (what ``bf16="auto"`` picks on a CPU with AVX-512 BF16/AMX);
* optionally the same with tiling (``--tile_voxels``) for the width the bundle uses (``--tile_width``, 0.5).

Columns: parameters, seconds (median of ``--repeats`` timed runs after one warm-up run), peak memory (peak RSS of
the process on CPU, ``torch.cuda.max_memory_allocated`` on CUDA) and its increase over the baseline taken after
imports, model and input creation, and the minimum / mean per-voxel cosine between the row's fine-head embedding
and the fp32 untiled one of the same network and input. Every configuration runs in a fresh subprocess so that
peak memory is not inherited from earlier configurations. Networks have random weights (fixed seed) and the input
is uniform random data in the network's input range [-50, 205] (fixed seed): speed does not depend on the values.

Reproduce the table in the bundle docs (run on an otherwise idle machine; it takes several minutes on 2 cores)::

    python scripts/benchmark_embedding.py --output table.md

Other examples::

    python scripts/benchmark_embedding.py --widths 0.5 --tile_voxels 4000000
    python scripts/benchmark_embedding.py --size 32,64,64 --repeats 1          # quick smoke test
    python scripts/benchmark_embedding.py --device cuda --bf16_only
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire
import monai
import torch
import torch.nn.functional as F

from samv2_components.inference import SAMv2Inferer, bf16_supported
from samv2_components.networks import INPUT_DIVISOR, SAMv2Net

CHILD_FLAG = "--_child"  # hidden mode: run one configuration and print its result as one JSON line
INPUT_RANGE = (-50.0, 205.0)  # the network's input range after intensity normalisation
SEED = 0
MIB = 1024.0 * 1024.0


# ---------------------------------------------------------------------------------------------- child process
def _peak_bytes(device: torch.device) -> int:
    """Peak memory so far: CUDA allocator peak, or this process's peak RSS (``ru_maxrss`` is KiB on Linux)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _sync(device: torch.device) -> None:
    """Wait for queued kernels so that wall-clock timings cover the work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_inferer(bf16: bool, max_tile_voxels: int | None) -> SAMv2Inferer:
    # fp32 rows: plain layout, float32 maps (the full-precision reference); bf16 rows: the bundles' fast path,
    # channels_last_3d and float16 maps
    return SAMv2Inferer(bf16=bf16, channels_last=bf16, max_tile_voxels=max_tile_voxels,
                        output_dtype="float16" if bf16 else "float32")


def run_configuration(config: dict[str, Any]) -> dict[str, Any]:
    """Time one configuration in this (fresh) process and return its measurements."""
    device = torch.device(config["device"])
    size = tuple(int(s) for s in config["size"])

    # same seeds in every subprocess: identical weights and input, so rows can be compared with each other
    torch.manual_seed(SEED)
    net = SAMv2Net(width=config["width"]).eval().to(device)
    generator = torch.Generator().manual_seed(SEED)
    low, high = INPUT_RANGE
    image = (torch.rand((1, 1, *size), generator=generator) * (high - low) + low).to(device)
    inferer = _make_inferer(config["bf16"], config["tile_voxels"])
    padded = [math.ceil(s / d) * d for s, d in zip(size, INPUT_DIVISOR)]
    n_tiles = len(inferer.tile_starts(padded))

    # baseline after imports, model and input: the increment is what the embedding pass itself needs
    _sync(device)
    if device.type == "cuda":
        baseline = int(torch.cuda.memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
    else:
        baseline = _peak_bytes(device)

    with torch.no_grad():  # the same grad mode the inferer uses inside
        inferer(image, net)  # warm-up: oneDNN primitive creation, allocator growth, weight layout conversion
        seconds: list[float] = []
        for _ in range(config["repeats"]):
            _sync(device)
            start = time.perf_counter()
            heads = inferer(image, net)
            _sync(device)
            seconds.append(time.perf_counter() - start)
        _sync(device)
        peak = _peak_bytes(device)  # read before the reference pass below, which is not part of this row

        cos_min = cos_mean = None
        if config["bf16"] or config["tile_voxels"] is not None:
            # reference: fp32, plain layout, whole volume, same weights and input
            net.to(memory_format=torch.contiguous_format)
            reference = _make_inferer(False, None)(image, net)["fine"]
            cosine = F.cosine_similarity(heads["fine"].float(), reference, dim=1)
            cos_min, cos_mean = float(cosine.min()), float(cosine.mean())

    return {
        "params": sum(p.numel() for p in net.parameters()),
        "tiles": n_tiles,
        "seconds": seconds,
        "peak_bytes": peak,
        "baseline_bytes": baseline,
        "cos_min": cos_min,
        "cos_mean": cos_mean,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------- parent process
def _speed_ratio(results: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    """One line comparing the fastest untiled bf16 row with the full-width untiled fp32 row of the same run."""
    untiled = [(statistics.median(r["seconds"]), c) for c, r in results if "error" not in r and c["tile_voxels"] is None]
    full = [t for t, c in untiled if not c["bf16"] and math.isclose(c["width"], 1.0)]
    fast = [(t, c["width"]) for t, c in untiled if c["bf16"]]
    if not full or not fast:
        return []
    seconds, width = min(fast)
    return ["", f"Speed-up in this run: width {width:g} in bf16 ({seconds:.2f} s) is {full[0] / seconds:.1f}x faster than "
                f"the full-width fp32 pass ({full[0]:.2f} s)."]


def _parse_list(value: Any, kind: type) -> list:
    """Accept what ``fire`` hands over for ``1,2,3``: a tuple/list, a single number, or a string."""
    if isinstance(value, (list, tuple)):
        return [kind(v) for v in value]
    if isinstance(value, str):
        return [kind(v) for v in value.replace(" ", "").split(",") if v]
    return [kind(value)]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run_child(config: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter so that its peak memory is its own."""
    cmd = [sys.executable, os.path.abspath(__file__), CHILD_FLAG, json.dumps(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        detail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"error": detail}
    return json.loads(lines[-1])


def _row(config: dict[str, Any], result: dict[str, Any]) -> str:
    width = f"{config['width']:g}"
    precision = "bf16 + channels_last, float16 maps" if config["bf16"] else "fp32"
    if "error" in result:  # e.g. out of memory: keep the row so the table shows what could not run
        error = result["error"].replace("|", "/")
        return f"| {width} | — | {precision} | — | failed: {error} | — | — | — |"
    peak = result["peak_bytes"] / MIB
    increase = (result["peak_bytes"] - result["baseline_bytes"]) / MIB
    # five decimals: bf16 errors show up in the fourth or fifth
    cosine = "—" if result["cos_min"] is None else f"{result['cos_min']:.5f} / {result['cos_mean']:.5f}"
    tiles = str(result["tiles"]) if config["tile_voxels"] is None else f"{result['tiles']} (≤{config['tile_voxels']:,} vox)"
    cells = [
        width,
        f"{result['params'] / 1e6:.2f}",
        precision,
        tiles,
        f"{statistics.median(result['seconds']):.2f}",
        f"{peak:.0f}",
        f"{increase:+.0f}",
        cosine,
    ]
    return "| " + " | ".join(cells) + " |"


def main(
    size: Any = "160,192,192",
    widths: Any = "1.0,0.5,0.375,0.25",
    repeats: int = 3,
    bf16_only: bool = False,
    tile_voxels: int | None = None,
    tile_width: float = 0.5,
    device: str = "cpu",
    output: str | None = None,
) -> None:
    """Print a Markdown table of the embedding pass for each width and precision.

    Args:
        size: input tensor size ``D,H,W`` (default 160,192,192 = 192 x 192 x 160 voxels X x Y x Z).
        widths: network widths to measure (1.0 = the published network; the bundle uses 0.5).
        repeats: timed runs per configuration (after one warm-up run); the median is reported.
        bf16_only: skip the fp32 rows (the bf16 cosine is still computed against an fp32 pass).
        tile_voxels: also measure tiled inference with this ``max_tile_voxels`` for ``tile_width``.
        tile_width: the width for the tiled rows (the bundle's light network, 0.5).
        device: ``cpu`` or ``cuda``.
        output: also write the table (with its header) to this file.
    """
    dims = _parse_list(size, int)
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"size must be D,H,W, got {size!r}")
    width_list = _parse_list(widths, float)
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    dev = torch.device(device)

    precisions = [True] if bf16_only else [False, True]
    configs: list[dict[str, Any]] = []
    for width in width_list:
        tilings: list[int | None] = [None]
        if tile_voxels is not None and math.isclose(width, tile_width):
            tilings.append(int(tile_voxels))
        for tiles in tilings:
            for bf16 in precisions:
                configs.append(
                    {"width": width, "bf16": bf16, "tile_voxels": tiles, "size": dims, "repeats": int(repeats), "device": device}
                )
    if tile_voxels is not None and not any(math.isclose(w, tile_width) for w in width_list):
        print(f"note: tile_width {tile_width} is not among --widths; no tiled rows", file=sys.stderr)

    rows, results = [], []
    child_threads = set()
    for i, config in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {config}", file=sys.stderr, flush=True)
        result = _run_child(config)
        child_threads.add(result.get("threads"))
        rows.append(_row(config, result))
        results.append((config, result))
    # subprocesses inherit the environment, so they should match; say so if they do not
    child_threads.discard(None)
    threads = str(torch.get_num_threads())
    if child_threads and child_threads != {torch.get_num_threads()}:
        threads += f" (subprocesses: {', '.join(map(str, sorted(child_threads)))})"

    d, h, w = dims
    if dev.type == "cuda":
        hardware = f"GPU {torch.cuda.get_device_name(dev)}; CPU {_cpu_model()}"
        memory = "CUDA `max_memory_allocated`; increase over `memory_allocated` after model and input creation"
        mem_cols = "peak CUDA alloc (MiB)"
    else:
        hardware = f"CPU {_cpu_model()}; native bf16: {'yes' if bf16_supported(dev) else 'no (emulated, slow)'}"
        memory = (
            "peak RSS of the subprocess (`ru_maxrss`); increase over the baseline after imports, model and input creation"
        )
        mem_cols = "peak RSS (MiB)"
    halo = tuple(SAMv2Inferer().halo)
    tiling = f"tiled rows: `max_tile_voxels={tile_voxels}`, halo {halo}" if tile_voxels is not None else "no tiling"
    lines = [
        "# SAMv2 embedding pass benchmark",
        "",
        f"- Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- Input: tensor (1, 1, {d}, {h}, {w}) in (D, H, W), i.e. {w} x {h} x {d} voxels (X x Y x Z); "
        f"uniform random in [{INPUT_RANGE[0]:g}, {INPUT_RANGE[1]:g}], seed {SEED}",
        f"- Networks: `SAMv2Net(width=...)`, heads fine + coarse + semantic, random weights (seed {SEED}; "
        "speed does not depend on the weights), eval mode",
        f"- Pass: `SAMv2Inferer(...)(image, net)` as in the bundles; seconds = median of {repeats} timed runs after "
        f"1 warm-up run; each configuration in a fresh subprocess; {tiling}",
        f"- Memory: {memory}",
        f"- Device: {dev.type}; {hardware}; torch threads: {threads}; "
        f"LD_PRELOAD: {os.environ.get('LD_PRELOAD') or 'none'}; "
        f"THP_MEM_ALLOC_ENABLE: {os.environ.get('THP_MEM_ALLOC_ENABLE') or 'unset'} (the `samv2` command sets 1)",
        f"- Versions: torch {torch.__version__}, monai {monai.__version__}, Python {platform.python_version()}",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        "",
        f"| width | params (M) | precision | tiles | seconds | {mem_cols} | increase (MiB) | cosine vs fp32, fine: min / mean |",
        "|---:|---:|:---|---:|---:|---:|---:|:---|",
        *rows,
        "",
        "fp32: float32, contiguous layout, whole volume. bf16: `torch.autocast(bfloat16)` + `channels_last_3d`. "
        "Cosine: per fine-grid voxel, between the row's fine-head embedding and the fp32 whole-volume one of the "
        "same network and input (for tiled fp32 rows it measures the tiling error alone); random weights, so trained "
        "weights may give different values.",
        *_speed_ratio(results),
    ]
    table = "\n".join(lines) + "\n"
    print(table, end="")
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(table)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == CHILD_FLAG:
        print(json.dumps(run_configuration(json.loads(sys.argv[2]))))
    else:
        fire.Fire(main)
