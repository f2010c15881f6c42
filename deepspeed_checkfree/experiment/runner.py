"""Running an experiment: measure the clock, train every strategy (simulated, in parallel jobs, or on the real
engine), then write the results. ``checkfree experiment`` is a thin wrapper around :func:`run_experiment`."""
from __future__ import annotations

import json
import logging
import multiprocessing
import queue as queue_mod
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import yaml

from .clock import GIB, ClockModel, pipelined_iteration
from .config import ExperimentConfig, from_dict, to_dict
from .report import report
from .strategies import StrategyResult, needs_mode, run_strategy

logger = logging.getLogger(__name__)
PROGRESS_EVERY = 5  # iterations per progress message from a worker


def _set_threads(threads: int) -> None:
    import torch
    torch.set_num_threads(max(1, threads))


def clock_model(cfg: ExperimentConfig, iteration_s: float, compute_s: float, stage_bytes: float,
                source: str) -> ClockModel:
    """The clock of ``cfg.wall_clock`` with the iteration time and stage size resolved."""
    wc = cfg.wall_clock
    return ClockModel(iteration_s=iteration_s, compute_s=compute_s, stage_bytes=stage_bytes,
                      optimizer_state_factor=wc.optimizer_state_factor,
                      transfer_bytes_s=wc.transfer_bandwidth_gib_s * GIB,
                      checkpoint_bytes_s=wc.checkpoint_bandwidth_gib_s * GIB,
                      checkpoint_blocking=wc.checkpoint_blocking,
                      checkpoint_stages=1 if wc.checkpoint_parallel else cfg.model.num_stages, restart_s=wc.restart_s,
                      redundant_extra_compute=wc.redundant_extra_compute, plus_slowdown=wc.plus_slowdown,
                      source=source, iteration_by_kind=dict(wc.strategy_iteration_time_s),
                      checkfree_recovery_s=wc.checkfree_recovery_s, redundant_recovery_s=wc.redundant_recovery_s)


def measure_clock(cfg: ExperimentConfig, threads: int = 1) -> ClockModel:
    """Resolve the ``wall_clock`` section, timing the simulated pipeline if ``iteration_time_s: measure`` and
    counting the largest stage if ``stage_bytes: measure``."""
    from .simulated import SimulatedPipeline

    wc, m, t = cfg.wall_clock, cfg.model, cfg.training
    need_timing = wc.iteration_time_s == "measure"
    pipe = SimulatedPipeline(cfg) if need_timing or wc.stage_bytes == "measure" else None
    stage_bytes = float(pipe.stage_bytes()) if pipe is not None and wc.stage_bytes == "measure" \
        else float(wc.stage_bytes)
    if not need_timing:
        it = float(wc.iteration_time_s)
        return clock_model(cfg, it, wc.compute_fraction * it, stage_bytes, "given")
    _set_threads(threads)
    assert pipe is not None
    pipe.train_step(0)  # warm-up (allocator, kernels)
    samples = []
    for step in range(1, wc.measure_steps + 1):
        t0 = time.perf_counter()
        pipe.train_step(step)
        samples.append(time.perf_counter() - t0)
    sequential = statistics.median(samples)
    activation_bytes = t.micro_batch_size * m.seq_len * m.d_model * 4
    parts = pipelined_iteration(sequential, m.num_stages, t.micro_batches, activation_bytes, stage_bytes,
                                wc.activation_bandwidth_gib_s * GIB, wc.gradient_bandwidth_gib_s * GIB,
                                wc.data_parallel)
    source = (f"measured: one-process step {sequential:.3f} s (median of {len(samples)}, {threads} thread(s)) "
              f"-> pipelined compute {parts['compute_s']:.3f} s + activations {parts['activation_s']:.3f} s + "
              f"gradient all-reduce {parts['gradient_s']:.3f} s")
    return clock_model(cfg, parts["iteration_s"], parts["compute_s"], stage_bytes, source)


def simulate_strategy(cfg: ExperimentConfig, name: str,
                      progress: Optional[Callable[[int], None]] = None) -> StrategyResult:
    """Train one strategy on a freshly built simulated pipeline (same initial weights for every strategy)."""
    from .simulated import SimulatedPipeline

    spec = next(s for s in cfg.strategies if s.name == name)
    backend = SimulatedPipeline(cfg, *needs_mode(spec))
    return run_strategy(cfg, spec, backend, cfg.failure_plan(), progress=progress)


def _pool_worker(cfg_data: Dict[str, Any], name: str, threads: int, progress_q: Any) -> Dict[str, Any]:
    _set_threads(threads)
    cfg = from_dict(cfg_data)
    pending = [0]

    def tick(n: int) -> None:
        pending[0] += n
        if pending[0] >= PROGRESS_EVERY:
            progress_q.put(pending[0])
            pending[0] = 0

    result = simulate_strategy(cfg, name, tick)
    if pending[0]:
        progress_q.put(pending[0])
    return result.as_dict()


def simulate_jobs(work: List[Tuple[Dict[str, Any], str]], jobs: int, threads: int,
                  advance: Callable[[int], None],
                  on_done: Optional[Callable[[int, StrategyResult], None]] = None) -> List[StrategyResult]:
    """Train each (experiment as :func:`.config.to_dict` data, strategy name) of ``work`` on the simulated
    pipeline, ``jobs`` at a time in spawned processes (in this process when ``jobs <= 1``).

    ``on_done(index, result)`` is called as each job finishes (a sweep saves it at once, so an interrupted run
    keeps what is done).
    """
    results: List[Optional[StrategyResult]] = [None] * len(work)

    def finish(i: int, res: StrategyResult) -> None:
        results[i] = res
        if on_done is not None:
            on_done(i, res)

    if jobs <= 1:
        _set_threads(threads)
        for i, (data, name) in enumerate(work):
            finish(i, simulate_strategy(from_dict(data), name, advance))
        return [r for r in results if r is not None]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        progress_q = manager.Queue()
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = [pool.submit(_pool_worker, data, name, threads, progress_q) for data, name in work]
            pending = set(range(len(futures)))
            while pending:
                try:
                    advance(progress_q.get(timeout=0.5))
                except queue_mod.Empty:
                    pass
                for i in [i for i in pending if futures[i].done()]:
                    pending.discard(i)
                    finish(i, StrategyResult.from_dict(futures[i].result()))
            while not progress_q.empty():
                advance(progress_q.get())
    return [r for r in results if r is not None]


def _run_simulated(cfg: ExperimentConfig, jobs: int, threads: int,
                   advance: Callable[[int], None]) -> Dict[str, StrategyResult]:
    names = [s.name for s in cfg.strategies]
    data = to_dict(cfg)
    return dict(zip(names, simulate_jobs([(data, n) for n in names], jobs, threads, advance)))


def run_experiment(cfg: ExperimentConfig, out: Path, jobs: int = 1, threads: int = 1, progress: bool = True,
                   plots: bool = True, timeout_s: float = 3600.0) -> Dict[str, Any]:
    """Run every strategy of ``cfg`` and write the results into ``out``.

    Args:
        cfg: the experiment.
        out: output directory (created): ``results.csv``, ``summary.json``, ``summary.md``, the PNGs,
            ``config.yaml`` (what ran) and ``raw/`` (per-strategy records, for ``--report-only``).
        jobs: strategies trained at once (simulated backend).
        threads: torch threads per job.
        progress: show a progress bar.
        plots: write the PNGs.
        timeout_s: hard limit per strategy of the deepspeed backend.

    Returns:
        The summary (see :func:`.report.summarize`).
    """
    from tqdm import tqdm

    out = Path(out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    total = cfg.training.iterations * len(cfg.strategies)
    import sys
    # In a log file (nohup, CI) a redraw every few tenths of a second would flood it.
    bar = tqdm(total=total, unit="it", desc=cfg.name, disable=not progress, dynamic_ncols=True,
               mininterval=0.2 if sys.stderr.isatty() else 30.0)
    try:
        bar.set_postfix_str("measuring the clock")
        clock = measure_clock(cfg, threads)
        (out / "clock.json").write_text(json.dumps(clock.as_dict(), indent=2) + "\n")
        bar.set_postfix_str(f"{len(cfg.strategies)} strategies")
        if cfg.backend == "deepspeed":
            from .engine_launch import run_on_engine
            results = run_on_engine(cfg, out, bar.update, timeout_s=timeout_s)
        else:
            results = _run_simulated(cfg, jobs, threads, bar.update)
    finally:
        bar.close()
    for name, res in results.items():
        (out / "raw" / f"{name}.json").write_text(json.dumps(res.as_dict()) + "\n")
    return report(out, cfg, results, clock, plots=plots)


def report_only(out: Path, plots: bool = True) -> Dict[str, Any]:
    """Rewrite the CSV, summary and plots of a finished run from ``out/raw`` and ``out/config.yaml`` (e.g. after
    changing ``wall_clock`` or ``report`` parameters in that file)."""
    out = Path(out)
    cfg = from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    results = {}
    for spec in cfg.strategies:
        path = out / "raw" / f"{spec.name}.json"
        if path.is_file():
            results[spec.name] = StrategyResult.from_dict(json.loads(path.read_text()))
    if cfg.wall_clock.iteration_time_s == "measure":
        # Keep the measured iteration (and measured stage size); every other parameter comes from config.yaml.
        old = json.loads((out / "clock.json").read_text())
        wc = cfg.wall_clock
        stage_bytes = old["stage_bytes"] if wc.stage_bytes == "measure" else float(wc.stage_bytes)
        clock = clock_model(cfg, old["iteration_s"], old["compute_s"], stage_bytes, old["source"])
    else:
        clock = measure_clock(cfg)
    return report(out, cfg, results, clock, plots=plots)
