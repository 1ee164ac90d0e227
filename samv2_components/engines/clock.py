"""Wall-clock budget and throughput report of a training run."""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

__all__ = ["DEFAULT_WARMUP_ITERATIONS", "TrainingClock"]

logger = logging.getLogger("samv2_components")

#: iterations a run's steady throughput leaves out (what the bundles' training configs use)
DEFAULT_WARMUP_ITERATIONS = 10


class TrainingClock:
    """Stop a run after ``limit_seconds`` of wall time (``engine.terminate()``: the run then completes normally, so
    the final weights are written) and log its throughput when it ends: iterations, seconds, steps per second and
    per hour, counted from the first iteration of this process (a resumed run counts only its own steps).

    Under DistributedDataParallel every rank stops at the same iteration: the ranks agree on "time is up" with one
    all-reduce per iteration (only when a limit is set), since a rank that stopped alone would leave the others
    waiting for its gradients. (ignite's ``TimeLimit`` decides per process.)

    A second line gives the steady throughput, counted after the first ``warmup_iterations`` of the process: the
    first iterations also create the convolution kernels for each input shape and, with a compiled network,
    compile it, a fixed cost that a short run would otherwise spread over every step.

    Args:
        limit_seconds: wall-time budget in seconds, or None for no limit.
        warmup_iterations: iterations left out of the steady throughput.
    """

    def __init__(self, limit_seconds: float | None = None, warmup_iterations: int = DEFAULT_WARMUP_ITERATIONS):
        if limit_seconds is not None and not float(limit_seconds) > 0:
            raise ValueError(f"max_train_seconds must be > 0 or null, got {limit_seconds!r}")
        if int(warmup_iterations) < 0:
            raise ValueError(f"warmup_iterations must be >= 0, got {warmup_iterations!r}")
        self.limit_seconds = None if limit_seconds is None else float(limit_seconds)
        self.warmup_iterations = int(warmup_iterations)
        self._start: float | None = None
        self._steady_start: float | None = None
        self._first_iteration = 0
        self.steps_per_second: float | None = None
        self.steady_steps_per_second: float | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED(once=engine.state.iteration + 1), self._started)
        engine.add_event_handler(Events.STARTED, self._on_start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._warmed_up)
        if self.limit_seconds is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._check_limit)
        engine.add_event_handler(Events.COMPLETED, self._report)

    def _check_limit(self, engine: Engine) -> None:
        up = self._start is not None and time.perf_counter() - self._start > self.limit_seconds
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([1.0 if up else 0.0], device=f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            up = bool(flag.item() > 0)
        if up:
            logger.info("reached the time limit of %.0f s: stopping after iteration %d", self.limit_seconds, engine.state.iteration)
            engine.terminate()

    def _on_start(self, engine: Engine) -> None:
        self._first_iteration = engine.state.iteration  # after a resume: the restored iteration

    def _started(self, engine: Engine) -> None:
        self._start = time.perf_counter()
        if self.warmup_iterations == 0:
            self._steady_start = self._start

    def _warmed_up(self, engine: Engine) -> None:
        if engine.state.iteration - self._first_iteration == self.warmup_iterations:
            self._steady_start = time.perf_counter()

    def _report(self, engine: Engine) -> None:
        if self._start is None:
            return
        steps = engine.state.iteration - self._first_iteration
        seconds = time.perf_counter() - self._start
        self.steps_per_second = steps / seconds if seconds > 0 else float("nan")
        logger.info(
            "throughput: %d iterations in %.1f s = %.3f steps/s (%.0f steps/h), iteration %d reached",
            steps, seconds, self.steps_per_second, 3600.0 * self.steps_per_second, engine.state.iteration,
        )
        steady_steps = steps - self.warmup_iterations
        if self._steady_start is None or steady_steps <= 0:
            return
        steady_seconds = time.perf_counter() - self._steady_start
        self.steady_steps_per_second = steady_steps / steady_seconds if steady_seconds > 0 else float("nan")
        logger.info(
            "steady throughput: %d iterations after the first %d in %.1f s = %.3f steps/s (%.0f steps/h)",
            steady_steps, self.warmup_iterations, steady_seconds, self.steady_steps_per_second,
            3600.0 * self.steady_steps_per_second,
        )
