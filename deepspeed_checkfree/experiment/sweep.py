"""A sweep of one experiment over failure rates and seeds (the paper's Table 2 and its ablation): the ``sweep:``
section next to ``experiment:``, its expansion into one experiment per (rate, seed), and running them all as one
pool of (rate, seed, strategy) jobs. Aggregation over seeds and the report: :mod:`.aggregate`.

Each seed sets the model initialisation, the data order and the failure plan at once (``sweep.seed_sets``), so
the spread over seeds covers all three. A failure-free strategy does not depend on the rate, so it trains once per
seed and every rate's report uses it with that rate's clock.
"""
from __future__ import annotations

import copy
import difflib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import yaml
from pydantic import Field, ValidationError, field_validator

from ..core.config import ConfigSection, format_validation_error, read_config_file
from ..errors import ConfigError
from .config import SECTION, ExperimentConfig, parse_experiment, to_dict

logger = logging.getLogger(__name__)
SWEEP = "sweep"
TOP_LEVEL_KEYS = (SECTION, SWEEP)
SeedTarget = Literal["training", "data", "failures"]


class PaperReference(ConfigSection):
    """What the paper reports at one rate, keyed by this file's strategy names (shown beside our ratios)."""

    hours: Dict[str, float] = Field(default_factory=dict, description="Hours to the paper's target loss (Table 2).")
    perplexity: Dict[str, float] = Field(default_factory=dict, description="Final perplexity (the ablation).")
    perplexity_excess_pct: Dict[str, Tuple[float, float]] = Field(
        default_factory=dict, description="Perplexity above the failure-free run, as a [low, high] range in % "
        "(Table 3).")


class RateSpec(ConfigSection):
    """One failure rate of the sweep."""

    hourly_rate: float = Field(gt=0.0, lt=1.0, description="Chance a stage fails within an hour (0.05 = 5%/h).")
    probability: Optional[float] = Field(None, gt=0.0, lt=1.0, description="Per-stage, per-iteration probability. "
                                         "The paper sets it by hand per rate (reference configs); without it the "
                                         "experiment's conversion p = 1 - (1 - rate)^(t / 3600) applies.")
    wall_clock: Dict[str, Any] = Field(default_factory=dict, description="Overrides of experiment.wall_clock at "
                                       "this rate (e.g. the paper's slower iterations at 16%/h).")
    paper: PaperReference = Field(default_factory=PaperReference)

    @property
    def key(self) -> str:
        """The rate in percent per hour, as typed on the command line (``5``, ``10``, ``16``)."""
        return f"{self.hourly_rate * 100:g}"

    @property
    def label(self) -> str:
        return f"{self.key}%/h"


class SweepSection(ConfigSection):
    """The ``sweep:`` section: seeds and failure rates."""

    seeds: List[int] = Field(min_length=1, description="Seeds; each is one full repetition of every strategy.")
    rates: List[RateSpec] = Field(min_length=1, description="Failure rates, each with its own failure plan.")
    seed_sets: List[SeedTarget] = Field(["training", "data", "failures"], min_length=1,
                                        description="What a seed sets: training.seed (initialisation), data.seed "
                                        "(order), failures.seed (plan).")

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: List[int]) -> List[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct, got {value}")
        return value

    @field_validator("rates")
    @classmethod
    def _unique_rates(cls, value: List[RateSpec]) -> List[RateSpec]:
        keys = [r.key for r in value]
        if len(set(keys)) != len(keys):
            raise ValueError(f"each hourly_rate must appear once, got {keys} (%/h)")
        return value


@dataclass
class Run:
    """One (rate, seed) of a sweep: an ordinary experiment."""

    rate: RateSpec
    seed: int
    cfg: ExperimentConfig

    @property
    def key(self) -> str:
        return f"rate_{self.rate.key}pct_seed{self.seed}"


@dataclass
class Sweep:
    """A parsed sweep file: the base experiment (as data), the sweep section and its runs."""

    base: Dict[str, Any]
    section: SweepSection
    runs: List[Run]

    @property
    def name(self) -> str:
        return self.base.get("name", "experiment")

    def as_dict(self) -> Dict[str, Any]:
        return {SWEEP: self.section.model_dump(mode="json"), SECTION: self.base}


def _merge(base: Dict[str, Any], override: Mapping[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def run_config(base: Mapping[str, Any], rate: RateSpec, seed: int, seed_sets: Sequence[str]) -> ExperimentConfig:
    """The experiment of one (rate, seed): the base with the rate's plan and clock and the seed applied."""
    data = copy.deepcopy(dict(base))
    failures = dict(data.get("failures") or {})
    failures.pop("probability", None)
    failures.pop("hourly_rate", None)
    if rate.probability is not None:
        failures["probability"] = rate.probability
    else:
        failures["hourly_rate"] = rate.hourly_rate
    for section in seed_sets:
        target = failures if section == "failures" else dict(data.get(section) or {})
        target["seed"] = seed
        if section != "failures":
            data[section] = target
    data["failures"] = failures
    data["wall_clock"] = _merge(dict(data.get("wall_clock") or {}), rate.wall_clock)
    data["name"] = f"{data.get('name', 'experiment')}, {rate.label}, seed {seed}"
    return parse_experiment(data, source=f"experiment at {rate.label}, seed {seed}")


def parse_sweep(data: Any, source: str = "sweep file", seeds: Optional[Sequence[int]] = None,
                rates: Optional[Sequence[str]] = None) -> Sweep:
    """Validate a whole sweep file (``experiment:`` and ``sweep:``), apply the ``--seeds``/``--rates`` overrides
    and expand it into its runs.

    Raises:
        ConfigError: unknown keys, an unknown rate, a paper reference naming a strategy the experiment does not
            run, or an invalid experiment at some (rate, seed).
    """
    if not isinstance(data, Mapping) or SWEEP not in data or SECTION not in data:
        raise ConfigError(f"the {source} needs both '{SECTION}:' and '{SWEEP}:' top-level keys.")
    try:
        section = SweepSection(**data[SWEEP])
    except ValidationError as err:
        raise ConfigError(f"invalid {source}: {format_validation_error(err, root=SWEEP)}") from None
    if seeds:
        section = section.model_copy(update={"seeds": list(seeds)})
        SweepSection(**section.model_dump())  # re-validate (distinct seeds)
    if rates:
        known = {r.key: r for r in section.rates}
        unknown = [r for r in rates if r not in known]
        if unknown:
            raise ConfigError(f"--rates {unknown} are not rates of the {source}; it defines {list(known)} (%/h). "
                              f"Add a sweep.rates entry (with the paper's per-iteration probability) or pick from "
                              f"those.")
        section = section.model_copy(update={"rates": [known[r] for r in rates]})
    base = dict(data[SECTION])
    base_cfg = parse_experiment(base, source=f"{source}, {SECTION}")
    names = [s.name for s in base_cfg.strategies]
    for rate in section.rates:
        for what, table in (("hours", rate.paper.hours), ("perplexity", rate.paper.perplexity),
                            ("perplexity_excess_pct", rate.paper.perplexity_excess_pct)):
            for name in table:
                if name not in names:
                    close = difflib.get_close_matches(name, names, n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    raise ConfigError(f"sweep.rates[{rate.label}].paper.{what} names strategy {name!r}, which the "
                                      f"experiment does not run.{hint} Strategies: {names}.")
    runs = [Run(rate, seed, run_config(base, rate, seed, section.seed_sets))
            for rate in section.rates for seed in section.seeds]
    return Sweep(base, section, runs)


def is_sweep_file(data: Any) -> bool:
    return isinstance(data, Mapping) and SWEEP in data


def load_sweep(path: Path, seeds: Optional[Sequence[int]] = None, rates: Optional[Sequence[str]] = None) -> Sweep:
    """Load a sweep file (see :func:`parse_sweep`)."""
    data = read_config_file(path, "experiment file")
    if not is_sweep_file(data):
        raise ConfigError(f"{str(path)!r} has no '{SWEEP}:' section, so --seeds/--rates have nothing to override. "
                          f"Add a sweep section (see configs/experiments/paper_table2.yaml).")
    return parse_sweep(data, source=f"experiment file {str(path)!r}", seeds=seeds, rates=rates)


def parse_seeds(text: str) -> List[int]:
    """``--seeds``: a comma-separated list, ranges allowed (``0,1,2`` or ``0-4``)."""
    seeds: List[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            lo, _, hi = part.partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give integers separated by commas, or ranges like 0-4.") from None
    if not seeds:
        raise ConfigError("--seeds is empty")
    return seeds


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------

def jobs(sweep: Sweep) -> List[Tuple[Run, str]]:
    """The (run, strategy) pairs to train: failure-free strategies once per seed (at the first rate)."""
    out, seen = [], set()
    for run in sweep.runs:
        for spec in run.cfg.strategies:
            if spec.kind == "no_failure":
                if (run.seed, spec.name) in seen:
                    continue
                seen.add((run.seed, spec.name))
            out.append((run, spec.name))
    return out


def shared_source(sweep: Sweep, run: Run, name: str) -> Run:
    """The run whose job trains ``name`` for ``run`` (itself, or the first rate's run of the same seed)."""
    spec = next(s for s in run.cfg.strategies if s.name == name)
    if spec.kind != "no_failure":
        return run
    return next(r for r in sweep.runs if r.seed == run.seed)


def run_sweep(sweep: Sweep, out: Path, jobs_n: int = 1, threads: int = 1, progress: bool = True,
              plots: bool = True) -> Dict[str, Any]:
    """Train every (rate, seed, strategy) of ``sweep`` and write the per-run and the aggregated reports.

    A job whose raw result is already in ``out`` for an identical run config is not trained again (so an
    interrupted sweep resumes).
    """
    from tqdm import tqdm
    from .runner import measure_clock, simulate_jobs
    from .strategies import StrategyResult

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(sweep.as_dict(), sort_keys=False))
    for run in sweep.runs:
        d = out / "runs" / run.key
        (d / "raw").mkdir(parents=True, exist_ok=True)
        old = d / "config.yaml"
        new = yaml.safe_dump(to_dict(run.cfg), sort_keys=False)
        if old.is_file() and old.read_text() != new:
            for stale in (d / "raw").glob("*.json"):
                stale.unlink()
        old.write_text(new)
    todo = [(r, n) for r, n in jobs(sweep) if not (out / "runs" / r.key / "raw" / f"{n}.json").is_file()]
    bar = tqdm(total=sum(r.cfg.training.iterations for r, _ in todo), unit="it", desc=sweep.name,
               disable=not progress, dynamic_ncols=True, mininterval=30.0)
    def save(i: int, res: StrategyResult) -> None:
        run, name = todo[i]
        (out / "runs" / run.key / "raw" / f"{name}.json").write_text(json.dumps(res.as_dict()) + "\n")

    try:
        measured = measure_clock(sweep.runs[0].cfg, threads)
        simulate_jobs([(to_dict(r.cfg), n) for r, n in todo], jobs_n, threads, bar.update, on_done=save)
    finally:
        bar.close()
    return report_sweep(sweep, out, measured, plots=plots)


def load_results(sweep: Sweep, out: Path) -> Dict[str, Dict[str, Any]]:
    """Every run's raw results (``StrategyResult`` per strategy name; a missing one is simply absent)."""
    from .strategies import StrategyResult

    loaded: Dict[str, Dict[str, Any]] = {}
    for run in sweep.runs:
        results = {}
        for spec in run.cfg.strategies:
            src = shared_source(sweep, run, spec.name)
            path = out / "runs" / src.key / "raw" / f"{spec.name}.json"
            if path.is_file():
                results[spec.name] = StrategyResult.from_dict(json.loads(path.read_text()))
        loaded[run.key] = results
    return loaded


def report_sweep(sweep: Sweep, out: Path, measured=None, plots: bool = True) -> Dict[str, Any]:
    """Per-run reports (``runs/<rate>_<seed>/summary.md`` ...) and the aggregated ``summary.md``/``.json``,
    ``evaluations.csv`` and band plots in ``out``."""
    from .runner import clock_model, measure_clock
    from .report import report
    from . import aggregate

    out = Path(out)
    if measured is None:
        measured = measure_clock(sweep.runs[0].cfg)
    loaded = load_results(sweep, out)
    per_run = {}
    for run in sweep.runs:
        clock = clock_model(run.cfg, measured.iteration_s, measured.compute_s, measured.stage_bytes,
                            measured.source)
        if run.cfg.wall_clock.iteration_time_s != "measure":
            clock = measure_clock(run.cfg)  # given numbers: no measurement, the rate's own clock
        results = loaded[run.key]
        aggregate.check_failure_plans(run, results)
        summary = report(out / "runs" / run.key, run.cfg, results, clock, plots=False) if results else None
        per_run[run.key] = (run, results, clock, summary)
    return aggregate.write(sweep, out, per_run, plots=plots)


def report_only(out: Path, plots: bool = True) -> Dict[str, Any]:
    """Rewrite a finished sweep's reports from ``out/config.yaml`` and the raw results."""
    data = yaml.safe_load((Path(out) / "config.yaml").read_text())
    return report_sweep(parse_sweep(data, source=f"{out}/config.yaml"), Path(out), plots=plots)
