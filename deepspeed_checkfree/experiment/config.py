"""The experiment file: one model, one data order, one seeded failure plan, several recovery strategies.

A YAML file with a single top-level ``experiment:`` key. Like the ``"checkfree"`` section, every sub-section is a
pydantic model on DeepSpeed's ``DeepSpeedConfigModel`` that rejects unknown keys with a did-you-mean hint, and
every error names the rule, the value and the fix.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from ..core.config import (AdjacentPolicy, ConfigSection, Mode, NormKind, Strategy, format_validation_error,
                           read_config_file)
from ..core.failures import FailurePlan, hourly_rate_to_probability, recoverable_stages
from ..errors import ConfigError
from ..models.llama import LlamaConfig

SECTION = "experiment"
# Keys of wall_clock.strategy_iteration_time_s: a strategy kind, or checkfree_plus for CheckFree+'s schedule.
CLOCK_KEYS = ("no_failure", "checkfree", "checkfree_plus", "checkpoint", "redundant")
Kind = Literal["no_failure", "checkfree", "checkpoint", "redundant"]

# Short names accepted in the strategy list, and what they mean.
SHORTHANDS: Dict[str, Dict[str, Any]] = {
    "no_failure": {"kind": "no_failure"},
    "gradnorm_average": {"kind": "checkfree", "mode": "checkfree", "strategy": "gradnorm_average"},
    "checkfree_plus": {"kind": "checkfree", "mode": "checkfree_plus", "strategy": "gradnorm_average"},
    # CheckFree+'s swapped schedule without failures: separates the cost of the schedule from that of recovery.
    "checkfree_plus_no_failure": {"kind": "no_failure", "mode": "checkfree_plus"},
    "uniform_average": {"kind": "checkfree", "mode": "checkfree", "strategy": "uniform_average"},
    "copy": {"kind": "checkfree", "mode": "checkfree", "strategy": "copy"},
    "random": {"kind": "checkfree", "mode": "checkfree", "strategy": "random"},
    "checkpoint": {"kind": "checkpoint", "every": 50},
    "redundant": {"kind": "redundant"},
}
# The paper's full comparison (arXiv 2506.15461, its experiments), in plotting order.
DEFAULT_STRATEGIES = ["no_failure", "gradnorm_average", "checkfree_plus", "uniform_average", "copy", "random",
                      "checkpoint_50", "redundant"]


class ModelSection(ConfigSection):
    """The LLaMA-style model and its pipeline layout."""

    num_stages: int = Field(4, ge=3, description="Pipeline stages (>= 3; CheckFree+ needs >= 4).")
    layers_per_stage: int = Field(1, ge=1, description="Transformer blocks per stage (equal on every stage, so "
                                  "neighbours can be averaged).")
    d_model: int = Field(64, ge=2, description="Width of the residual stream.")
    n_heads: int = Field(4, ge=1, description="Attention heads; d_model / n_heads must be even (rotary).")
    seq_len: int = Field(64, ge=2, description="Tokens per sample.")
    ffn_hidden: Optional[int] = Field(None, ge=1, description="SwiGLU width; default 8/3 d_model rounded up to 32.")
    vocab_size: int = Field(256, ge=2, description="Vocabulary; 256 for the shipped byte-level corpus.")
    rope_theta: float = Field(10000.0, gt=0.0, description="Rotary base.")

    def llama(self) -> LlamaConfig:
        return LlamaConfig(vocab_size=self.vocab_size, seq_len=self.seq_len, d_model=self.d_model,
                           n_heads=self.n_heads, n_layers=self.num_stages * self.layers_per_stage,
                           ffn_hidden=self.ffn_hidden, rope_theta=self.rope_theta)


class DataSection(ConfigSection):
    """The corpus and the data order (identical for every strategy)."""

    corpus: Optional[str] = Field(None, description="A .txt or .txt.xz file; default: the shipped State of the "
                                  "Union corpus, as byte tokens.")
    val_fraction: float = Field(0.05, gt=0.0, lt=1.0, description="Share of the corpus held out for validation "
                                "(interleaved blocks).")
    seed: int = Field(0, description="Data-order seed: batch (step, micro-batch) is the same in every strategy.")


class TrainingSection(ConfigSection):
    """Optimisation, shared by every strategy (the paper: Adam, constant LR for LLaMA, per-stage clip 1.0)."""

    iterations: int = Field(1000, ge=1, description="Executed iterations per strategy (the x-axis: a rolled-back "
                            "iteration of the checkpointing strategy counts, since it took time).")
    micro_batch_size: int = Field(8, ge=1, description="Samples per micro-batch.")
    micro_batches: int = Field(4, ge=1, description="Micro-batches per iteration (gradient accumulation).")
    lr: float = Field(1e-3, gt=0.0, description="Constant learning rate (AdamW).")
    betas: Tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (the reference uses 0).")
    per_stage_clip: Optional[float] = Field(1.0, gt=0.0, description="Clip each stage's gradient to this norm and "
                                            "weight neighbours by the clipped norm, as the reference code does; "
                                            "null: no clipping, unclipped norms.")
    lr_boost: float = Field(1.1, gt=0.0, description="LR multiplier of a rebuilt stage (paper: 1.1; 1.2 at 500M).")
    eps: float = Field(1e-4, ge=0.0, description="Added to each neighbour's gradient norm.")
    norm: NormKind = Field("plain", description="Weight by the plain or the squared gradient norm.")
    on_adjacent_failure: AdjacentPolicy = Field("interpolate", description="Adjacent stages lost together: "
                                                "interpolate between the nearest survivors, or stop the strategy.")
    eval_every: int = Field(25, ge=1, description="Validation loss every this many executed iterations (and at "
                            "the last one).")
    eval_batches: int = Field(8, ge=1, description="Validation micro-batches (the same ones at every evaluation).")
    seed: int = Field(0, description="Model initialisation seed (and of the 'random' strategy's re-init).")
    device: str = Field("cpu", description="Device of the simulated backend: cpu, cuda, cuda:N.")


class FailureAt(ConfigSection):
    """One planned failure: ``stage`` is lost before the forward pass of executed iteration ``iteration``."""

    stage: int = Field(ge=0)
    iteration: int = Field(ge=0)


class FailuresSection(ConfigSection):
    """The failure plan (paper section 4): each listed stage fails independently per iteration, seeded."""

    probability: Optional[float] = Field(None, ge=0.0, lt=1.0, description="Per-stage, per-iteration failure "
                                         "probability (the paper's p).")
    hourly_rate: Optional[float] = Field(None, ge=0.0, lt=1.0, description="Instead of probability: the chance a "
                                         "stage fails within an hour (0.1 = 10%/h), mapped to p with "
                                         "iteration_time_s as p = 1 - (1 - rate)^(iteration_time_s / 3600).")
    iteration_time_s: Optional[float] = Field(None, gt=0.0, description="Iteration time used to map hourly_rate; "
                                              "default: wall_clock.iteration_time_s when that is a number.")
    stages: Optional[Union[Literal["middle", "all"], List[int]]] = Field(
        None, description="Stages that can fail: 'middle' (1..P-2, rebuildable by every CheckFree variant; the "
        "default), 'all', or a list.")
    at: List[FailureAt] = Field(default_factory=list, description="Explicit failures, on top of the random ones.")
    seed: int = Field(0, description="Seed of the plan: the same seed gives the same failures to every strategy.")

    @model_validator(mode="after")
    def _one_rate(self) -> "FailuresSection":
        if self.probability is not None and self.hourly_rate is not None:
            raise ValueError(f"give either probability ({self.probability}) or hourly_rate ({self.hourly_rate}), "
                             f"not both")
        return self


class StrategySpec(ConfigSection):
    """One recovery strategy. In YAML a short name (``gradnorm_average``, ``checkpoint_100``, ...) or a mapping."""

    name: str = Field(description="Label in the CSV, the table and the plots (unique).")
    kind: Kind = Field(description="no_failure | checkfree | checkpoint | redundant.")
    mode: Mode = Field("checkfree", description="CheckFree variant (kind checkfree; kind no_failure with "
                       "checkfree_plus trains CheckFree+'s swapped schedule without failures).")
    strategy: Strategy = Field("gradnorm_average", description="How a middle stage is rebuilt (kind checkfree).")
    every: int = Field(50, ge=1, description="Checkpoint interval in training steps (kind checkpoint).")

    @property
    def label(self) -> str:
        """A readable description for tables."""
        if self.kind == "checkfree":
            base = "CheckFree+" if self.mode == "checkfree_plus" else "CheckFree"
            return base if self.strategy == "gradnorm_average" else f"{base} ({self.strategy})"
        if self.kind == "checkpoint":
            return f"checkpoint every {self.every}"
        if self.kind == "no_failure" and self.mode == "checkfree_plus":
            return "CheckFree+ schedule, no failures"
        return {"no_failure": "no failures", "redundant": "redundant computation"}[self.kind]

    @property
    def pipeline_mode(self) -> str:
        """The pipeline this strategy trains: CheckFree+'s swapped schedule, or the plain one."""
        return self.mode if self.kind in ("checkfree", "no_failure") else "checkfree"


class WallClockSection(ConfigSection):
    """Parameters of the wall-clock model (see :mod:`.clock`); defaults from the paper's cost model."""

    iteration_time_s: Union[float, Literal["measure"]] = Field(
        "measure", description="Failure-free pipeline iteration time: a number, or 'measure' (this machine's "
        "compute, pipelined over the stages, plus modelled activation and gradient traffic).")
    measure_steps: int = Field(5, ge=1, description="Timed training steps when measuring.")
    compute_fraction: float = Field(0.6, gt=0.0, le=1.0, description="Share of a given iteration_time_s that is "
                                    "compute (measured when iteration_time_s is 'measure'); scales the redundant "
                                    "strategy's extra work.")
    stage_bytes: Union[float, Literal["measure"]] = Field(
        "measure", description="Bytes of one stage's weights: a number, or 'measure' (the largest stage of the "
        "model, fp32).")
    optimizer_state_factor: float = Field(2.0, ge=0.0, description="Optimizer state per weight byte (Adam: 2 "
                                          "moments); checkpoints and replicas carry weights and this state.")
    activation_bandwidth_gib_s: float = Field(0.1, gt=0.0, description="Link carrying activations between stages "
                                              "(paper: ~0.1 GiB/s).")
    gradient_bandwidth_gib_s: float = Field(0.2, gt=0.0, description="Link for the data-parallel gradient "
                                            "all-reduce (paper: ~0.2 GiB/s).")
    data_parallel: int = Field(1, ge=1, description="Data-parallel replicas of each stage (all-reduce cost).")
    transfer_bandwidth_gib_s: float = Field(0.1, gt=0.0, description="Link a replacement node downloads a "
                                            "neighbour's weights over (CheckFree, redundant).")
    checkpoint_bandwidth_gib_s: float = Field(0.1, gt=0.0, description="Link to checkpoint storage (paper: "
                                              "checkpoints move at link speed).")
    checkpoint_blocking: bool = Field(True, description="Training waits while a checkpoint is written.")
    checkpoint_parallel: bool = Field(False, description="false: the whole model goes to storage over one link "
                                      "(the paper's description); true: each stage writes its shard in parallel.")
    restart_s: float = Field(0.0, ge=0.0, description="Detection plus a replacement node joining, charged to every "
                                                      "failure of every strategy.")
    redundant_extra_compute: float = Field(1.0 / 3.0, ge=0.0, description="Bamboo-style redundant computation runs "
                                           "one extra forward per micro-batch: ~1/3 of forward+backward compute.")
    plus_slowdown: float = Field(1.0, gt=0.0, description="Iteration-time factor of CheckFree+ (replica compute "
                                 "is small; the real engine measured 1.03 on CPU).")
    strategy_iteration_time_s: Dict[str, float] = Field(
        default_factory=dict, description="Per-strategy iteration times that replace the modelled ones (the "
        "paper's Table 2 states one per method); keys: " + ", ".join(CLOCK_KEYS) + ".")
    checkfree_recovery_s: Optional[float] = Field(None, ge=0.0, description="If set, one CheckFree failure event "
                                                  "costs exactly this (the paper: 'around 30 seconds') instead of "
                                                  "restart_s plus the neighbours' weight transfer.")
    redundant_recovery_s: Optional[float] = Field(None, ge=0.0, description="If set, one failure event under "
                                                  "redundant computation costs exactly this.")

    @field_validator("strategy_iteration_time_s")
    @classmethod
    def _known_clock_keys(cls, value: Dict[str, float]) -> Dict[str, float]:
        import difflib
        for key, seconds in value.items():
            if key not in CLOCK_KEYS:
                close = difflib.get_close_matches(key, CLOCK_KEYS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown strategy_iteration_time_s key {key!r}.{hint} Known: "
                                 f"{', '.join(CLOCK_KEYS)}.")
            if not seconds > 0:
                raise ValueError(f"strategy_iteration_time_s[{key!r}]={seconds} must be a positive number of "
                                 f"seconds.")
        return value


class ReportSection(ConfigSection):
    """How results are summarised."""

    target_loss: Optional[float] = Field(None, gt=0.0, description="Validation loss for 'time to target'; "
                                         "default: what no_failure reaches after target_fraction of the run.")
    target_fraction: float = Field(0.6, gt=0.0, le=1.0, description="See target_loss.")


class ExperimentConfig(ConfigSection):
    """An ``experiment:`` file."""

    name: str = Field("experiment", description="Title of the plots and tables.")
    backend: Literal["simulated", "deepspeed"] = Field("simulated", description="simulated: the pipeline in one "
                                                      "process (fast, like the paper); deepspeed: num_stages real "
                                                      "processes running the CheckFree engine.")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    failures: FailuresSection = Field(default_factory=FailuresSection)
    strategies: List[StrategySpec] = Field(default_factory=list)
    wall_clock: WallClockSection = Field(default_factory=WallClockSection)
    report: ReportSection = Field(default_factory=ReportSection)

    @field_validator("strategies", mode="before")
    @classmethod
    def _expand_strategies(cls, value: Any) -> Any:
        if value is None or value == []:
            value = list(DEFAULT_STRATEGIES)
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ValueError(f"strategies must be a list, got {value!r}")
        return [expand_strategy(v) for v in value]

    # ------------------------------------------------------------------------------------------------------
    # Derived values
    # ------------------------------------------------------------------------------------------------------

    def failure_stages(self) -> Tuple[int, ...]:
        """Stages the random part of the plan applies to."""
        p = self.model.num_stages
        stages = self.failures.stages
        if stages is None or stages == "middle":
            return recoverable_stages(p, "checkfree")
        if stages == "all":
            return tuple(range(p))
        return tuple(sorted(set(stages)))

    def failure_probability(self) -> float:
        """The per-stage, per-iteration probability (hourly rates converted as documented)."""
        f = self.failures
        if f.hourly_rate is not None:
            return hourly_rate_to_probability(f.hourly_rate, self._mapping_iteration_time())
        return f.probability or 0.0

    def _mapping_iteration_time(self) -> float:
        if self.failures.iteration_time_s is not None:
            return self.failures.iteration_time_s
        assert not isinstance(self.wall_clock.iteration_time_s, str)  # checked by check()
        return float(self.wall_clock.iteration_time_s)

    def failure_plan(self) -> FailurePlan:
        """The seeded plan every strategy sees; ``failures_at(i)`` is evaluated per executed iteration."""
        return FailurePlan(num_stages=self.model.num_stages,
                           explicit=tuple((a.stage, a.iteration) for a in self.failures.at),
                           probability=self.failure_probability(), stages=self.failure_stages(),
                           seed=self.failures.seed)

    def checkfree_section(self, spec: StrategySpec) -> Dict[str, Any]:
        """The ``"checkfree"`` section the real engine runs ``spec`` with (failures are driven by the runner)."""
        t = self.training
        section: Dict[str, Any] = {"enabled": True, "mode": spec.pipeline_mode,
                                   "strategy": spec.strategy, "lr_boost": t.lr_boost, "eps": t.eps,
                                   "norm": t.norm, "on_adjacent_failure": t.on_adjacent_failure, "seed": t.seed}
        if t.per_stage_clip is not None:
            section["per_stage_clip"] = t.per_stage_clip
        return section

    # ------------------------------------------------------------------------------------------------------
    # Cross-field rules
    # ------------------------------------------------------------------------------------------------------

    def check(self) -> None:  # noqa: C901 (one rule per block, each with its own message)
        """Check the rules that span sections.

        Raises:
            ConfigError: with the rule, the values and the fix.
        """
        m, t, f = self.model, self.training, self.failures
        p = m.num_stages
        if m.d_model % m.n_heads or (m.d_model // m.n_heads) % 2:
            raise ConfigError(f"experiment.model: d_model={m.d_model} must split into n_heads={m.n_heads} heads of "
                              f"even size (rotary embeddings rotate pairs). Change d_model or n_heads.")
        names = [s.name for s in self.strategies]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"experiment.strategies: names must be unique, {dupes} appear more than once. Give "
                              f"each entry its own 'name'.")
        plus = [s.name for s in self.strategies if s.pipeline_mode == "checkfree_plus"]
        if plus and p < 4:
            raise ConfigError(f"experiment.strategies {plus} use CheckFree+, which swaps the first two and the last "
                              f"two stages and so needs model.num_stages >= 4 (got {p}). Add stages or remove them.")
        if plus and t.micro_batches < 2:
            raise ConfigError(f"experiment.strategies {plus} use CheckFree+, which runs every other micro-batch "
                              f"out of order and so needs training.micro_batches >= 2 (got {t.micro_batches}).")
        if f.hourly_rate is not None and f.iteration_time_s is None and \
                isinstance(self.wall_clock.iteration_time_s, str):
            raise ConfigError(
                f"experiment.failures.hourly_rate={f.hourly_rate} needs an iteration time to become a per-iteration "
                f"probability, and wall_clock.iteration_time_s is 'measure' (the plan must not depend on a "
                f"measurement). Set failures.iteration_time_s (the paper's 124M runs: ~20 s, 500M: ~75 s).")
        for i, s in enumerate(f.stages if isinstance(f.stages, list) else []):
            if not 0 <= s < p:
                raise ConfigError(f"experiment.failures.stages[{i}]={s} is not a stage of the {p}-stage pipeline "
                                  f"(0..{p - 1}).")
        for i, a in enumerate(f.at):
            if a.stage >= p:
                raise ConfigError(f"experiment.failures.at[{i}] names stage {a.stage}, but the pipeline has stages "
                                  f"0..{p - 1}.")
            if a.iteration >= t.iterations:
                raise ConfigError(f"experiment.failures.at[{i}] is at iteration {a.iteration}, but the run has "
                                  f"training.iterations={t.iterations}; it would never happen.")
        middle = recoverable_stages(p, "checkfree")
        edges = sorted({s for s in (*self.failure_stages(), *(a.stage for a in f.at)) if s not in middle})
        if (self.failure_probability() > 0 or f.at) and edges:
            plain = [s.name for s in self.strategies if s.kind == "checkfree" and s.mode == "checkfree"]
            if plain:
                raise ConfigError(
                    f"the failure plan can lose edge stage(s) {edges}, which plain CheckFree cannot rebuild (one "
                    f"neighbour only), but strategies {plain} use it; every strategy must face the same plan. Set "
                    f"failures.stages: middle, or keep only checkfree_plus, checkpoint, redundant and no_failure.")
        if self.report.target_loss is None and self.reference_strategy() is None:
            raise ConfigError("experiment.report.target_loss is not set and no no_failure strategy (on the plain "
                              "schedule) runs to derive it from. Set report.target_loss or add no_failure to the "
                              "strategies.")

    def reference_strategy(self) -> Optional[str]:
        """The failure-free run on the plain schedule (the target loss and the plots' reference), if any."""
        return next((s.name for s in self.strategies if s.kind == "no_failure" and s.pipeline_mode == "checkfree"),
                    None)


def expand_strategy(value: Any) -> Any:
    """A strategy list entry as a mapping: short names (``copy``, ``checkpoint_100``) are expanded."""
    if isinstance(value, str):
        m = re.fullmatch(r"checkpoint_(\d+)", value)
        if m:
            return {"name": value, "kind": "checkpoint", "every": int(m.group(1))}
        if value not in SHORTHANDS:
            import difflib
            close = difflib.get_close_matches(value, [*SHORTHANDS, "checkpoint_50"], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown strategy {value!r}.{hint} Known: {', '.join(SHORTHANDS)}, checkpoint_K "
                             f"(K = interval), or a mapping with name/kind/mode/strategy/every.")
        base = dict(SHORTHANDS[value])
        if value == "checkpoint":
            return {"name": f"checkpoint_{base['every']}", **base}
        return {"name": value, **base}
    if isinstance(value, Mapping) and "name" not in value:
        kind = value.get("kind")
        if kind == "checkfree":
            name = value.get("strategy", "gradnorm_average")
            if value.get("mode") == "checkfree_plus":
                name = "checkfree_plus" if name == "gradnorm_average" else f"checkfree_plus_{name}"
        elif kind == "checkpoint":
            name = f"checkpoint_{value.get('every', 50)}"
        else:
            name = kind
        return {"name": name, **value}
    return value


def parse_experiment(data: Any, source: str = "experiment") -> ExperimentConfig:
    """Validate the mapping under ``experiment:``.

    Raises:
        ConfigError: not a mapping, unknown keys, invalid values or cross-section rules broken.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"the {source} must be a mapping of keys to values, got {type(data).__name__}.")
    try:
        cfg = ExperimentConfig(**data)
    except ValidationError as err:
        raise ConfigError(f"invalid {source}: {format_validation_error(err, root=SECTION)}") from None
    cfg.check()
    return cfg


def load_experiment(path: Union[str, os.PathLike]) -> ExperimentConfig:
    """Load an experiment YAML (or JSON) file whose top-level key is ``experiment:``.

    Raises:
        ConfigError: the file cannot be read or parsed, lacks the key, or its content is invalid.
    """
    p = Path(path)
    data = read_config_file(p, "experiment file")
    if not isinstance(data, Mapping) or SECTION not in data:
        keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ConfigError(f"{str(p)!r} has no top-level '{SECTION}:' key (found {keys}). An experiment file "
                          f"puts everything under 'experiment:'; see configs/experiments/.")
    extra = sorted(set(data) - {SECTION, "sweep"})
    if extra:
        raise ConfigError(f"{str(p)!r} has unknown top-level keys {extra}; an experiment file has '{SECTION}:' "
                          f"and optionally 'sweep:' (seeds and failure rates).")
    return parse_experiment(data[SECTION], source=f"experiment file {str(p)!r}")


def to_dict(cfg: ExperimentConfig) -> Dict[str, Any]:
    """The fully resolved config as plain data (what was run; written next to the results)."""
    return {SECTION: cfg.model_dump(mode="json")}


def from_dict(data: Mapping[str, Any]) -> ExperimentConfig:
    """Inverse of :func:`to_dict` (used to hand the config to worker processes)."""
    return parse_experiment(data[SECTION])


def select_strategies(cfg: ExperimentConfig, names: Optional[List[str]]) -> ExperimentConfig:
    """A copy of ``cfg`` running only ``names`` (in the file's order); unknown names are an error."""
    if not names:
        return cfg
    known = [s.name for s in cfg.strategies]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--strategies names {unknown} that the experiment does not define; it has {known}.")
    data = cfg.model_dump(mode="json")
    data["strategies"] = [s for s in data["strategies"] if s["name"] in names]
    return parse_experiment(data)
