"""The ``"checkfree"`` configuration section: one schema for the DeepSpeed JSON and for YAML files.

The models build on DeepSpeed's own ``DeepSpeedConfigModel`` and, like DeepSpeed's sub-configs, reject unknown
keys; unlike pydantic's default message, the error names the closest known key.
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, List, Literal, Mapping, Optional, Union

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from deepspeed.runtime.config_utils import DeepSpeedConfigModel

from ..errors import ConfigError

SECTION = "checkfree"

Mode = Literal["checkfree", "checkfree_plus"]
Strategy = Literal["gradnorm_average", "uniform_average", "copy", "random"]
NormKind = Literal["plain", "squared"]
AdjacentPolicy = Literal["interpolate", "stop"]


class ConfigSection(DeepSpeedConfigModel):
    """A config section that rejects unknown keys with a did-you-mean hint (the base of every section here and of
    the experiment file's)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, validate_assignment=True,
                              populate_by_name=True, arbitrary_types_allowed=False)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        known = set(cls.model_fields)
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown key {key!r}.{hint} Known keys: {', '.join(sorted(known))}.")
        return data



class FailureAt(ConfigSection):
    """One planned failure: ``stage`` is lost before the forward pass of the step that starts at ``step``."""


    stage: int = Field(ge=0, description="Pipeline stage id to lose.")
    step: int = Field(ge=0, description="Value of engine.global_steps when the failure strikes (before that "
                      "step's first micro-batch, as in the paper's failure generator).")


ReplacementPhase = Literal["arrival", "rendezvous", "build", "rebind", "rebuild"]


class ReplacementKills(ConfigSection):
    """Deaths of one rank's replacements, each in a phase of its re-join (a test aid, through hooks, not timing)."""


    rank: int = Field(ge=0, description="The global rank whose replacements die.")
    phases: List[ReplacementPhase] = Field(description="The n-th replacement of the rank (incarnation n) SIGKILLs "
                                           "itself in phases[n-1]: 'arrival' (after counting itself in for a "
                                           "generation), 'rendezvous' (after publishing its address in the process "
                                           "group's rendezvous), 'build' (building its engine), 'rebind' (with the "
                                           "group formed, before its engine binds to it), 'rebuild' (after "
                                           "receiving its first neighbour's weights). Later ones live.")


class FailureInjectionConfig(ConfigSection):
    """A seeded failure plan that every rank evaluates identically without communicating."""


    at: List[FailureAt] = Field(default_factory=list, description="Explicit (stage, step) failures.")
    probability: float = Field(0.0, ge=0.0, le=1.0,
                               description="Per-stage, per-iteration failure probability (the paper's p).")
    stages: Optional[List[int]] = Field(None, description="Stages the probability applies to; default: every "
                                        "stage the configured mode can rebuild.")
    seed: int = Field(0, description="Seed of the probabilistic plan; the same seed gives the same plan.")
    kill_during_rebuild: Optional[int] = Field(None, ge=0, description="Under the supervisor: the first replacement "
                                               "of this stage's trainer kills itself (SIGKILL) after receiving its "
                                               "first neighbour's weights, to exercise a death during a rebuild.")
    kill_replacements: Optional[ReplacementKills] = Field(None, description="Under the supervisor: a rank's "
                                                          "replacements die, one per phase of their re-join (see "
                                                          "ReplacementKills), to exercise a death at any phase.")


class CheckFreeConfig(ConfigSection):
    """The ``"checkfree"`` section of a DeepSpeed config (or a YAML file with the same keys)."""

    enabled: bool = Field(False, description="Turn CheckFree on. Off (or no section) leaves DeepSpeed untouched.")
    mode: Mode = Field("checkfree", description="'checkfree' rebuilds middle stages from their two neighbours; "
                       "'checkfree_plus' adds out-of-order micro-batches and (de)embedding replicas so the first "
                       "and last stages can be rebuilt too.")
    strategy: Strategy = Field("gradnorm_average", description="How a middle stage is rebuilt: the paper's "
                               "gradient-norm-weighted average, or the ablations uniform_average, copy (of the "
                               "previous stage) and random (fresh initialisation).")
    lr_boost: float = Field(1.1, gt=0.0, description="The rebuilt stage's learning rate is the scheduled LR times "
                            "this factor for the rest of training (paper: 1.1 for 124M/1.5B, 1.2 for 500M).")
    eps: float = Field(1e-4, ge=0.0, description="Added to each neighbour's gradient norm before weighting.")
    norm: NormKind = Field("plain", description="Weight neighbours by the plain L2 norm of their gradient (the "
                           "reference code) or by its square.")
    per_stage_clip: Optional[float] = Field(None, gt=0.0, description="If set, clip each stage's gradient to this "
                                            "norm before the optimizer step and record the clipped norm, as the "
                                            "reference code does with 1.0. Default: record the unclipped norm "
                                            "and leave the gradients alone.")
    on_adjacent_failure: AdjacentPolicy = Field("interpolate", description="Several adjacent stages lost at once: "
                                                "interpolate between the nearest survivors on both sides, or stop "
                                                "with an error.")
    seed: int = Field(0, description="Seed of the 'random' strategy's re-initialisation.")
    failure_injection: FailureInjectionConfig = Field(default_factory=FailureInjectionConfig,
                                                      description="Planned failures, for demos and experiments.")
    events_file: Optional[str] = Field(None, description="Append one JSON line per detection and recovery here "
                                       "(the records also go to the 'deepspeed_checkfree.events' logger).")
    detection_timeout_s: float = Field(30.0, gt=0.0, description="Under the supervisor (real process loss): the "
                                       "process-group timeout, i.e. how long a rank waits on a dead peer before "
                                       "it declares a failure. Must exceed the longest legitimate wait of one step "
                                       "(about one step time); neighbours of a dead rank notice at once.")
    join_timeout_s: float = Field(600.0, gt=0.0, description="How long the survivors wait for a replacement (a "
                                  "respawned trainer, or a new machine running the join command).")
    max_failures: int = Field(100, ge=0, description="Give up after this many re-formations of the process group.")
    spare_builds_engine: bool = Field(False, description="Under the supervisor: the warm spare builds its "
                                      "stage's engine (model, optimizer) before it is needed, so that a replacement "
                                      "only joins the group and rebuilds. It then holds a second copy of the stage "
                                      "on the machine: leave it off when the stage fills the accelerator's memory.")
    store: Optional[str] = Field(None, description="Under the supervisor: keep the job's coordination state in "
                                 "etcd (etcd://host:port[,host:port...], etcds:// for TLS), so that losing rank 0's "
                                 "machine is survived. The supervisor reads it from the training script's "
                                 "--deepspeed_config; its --store flag (or $CHECKFREE_STORE) may give the same "
                                 "store, never another. Unset: the embedded store hosted by rank 0's supervisor.")
    park_memory_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Under the supervisor: a rank that leaves "
                                        "on a preemption notice with no replacement waiting parks its stage's exact "
                                        "state (weights, optimizer state, fp32 masters) in a neighbour's host "
                                        "memory until one joins; a neighbour accepts only if it fits in this "
                                        "fraction of the memory its machine has available. 0: never park (the "
                                        "replacement is then rebuilt from its neighbours).")
    plus_recompute_edges: Union[bool, Literal["all"]] = Field(
        False, description="CheckFree+ only: stages 0 and 1 keep only the stage input of some micro-batches and run "
        "their forward again in the backward (inside DeepSpeed's checkpoint), so the first pair holds no more "
        "activations than DeepSpeed's 1F1B holds on its first stage (P micro-batches; without it the pair holds up "
        "to P + 2). true: the fewest micro-batches that reach that level (none at 4 stages; 8 of 32 on each of the "
        "pair at 6 stages); 'all': "
        "every micro-batch of stages 0 and 1 (the least memory). Cost: one extra forward of stages 0 and 1 per "
        "recomputed micro-batch.")
    heartbeat_interval_s: Optional[float] = Field(None, gt=0.0, description="Under the supervisor: how often the "
                                                  "trainer tells its supervisor it is alive. A trainer silent for "
                                                  "detection_timeout_s is killed as hung and replaced. Default: "
                                                  "min(1, detection_timeout_s / 4); must be below "
                                                  "detection_timeout_s.")

    @model_validator(mode="after")
    def _heartbeat_below_detection(self) -> "CheckFreeConfig":
        if self.heartbeat_interval_s is not None and self.heartbeat_interval_s >= self.detection_timeout_s:
            raise ValueError(f"heartbeat_interval_s={self.heartbeat_interval_s} must be below detection_timeout_s="
                             f"{self.detection_timeout_s}, or every trainer would count as hung. Lower "
                             f"heartbeat_interval_s (or leave it unset: detection_timeout_s / 4).")
        return self

    @field_validator("plus_recompute_edges", mode="before")
    @classmethod
    def _recompute_policy(cls, value: Any) -> Any:
        if not (isinstance(value, bool) or value == "all"):
            raise ValueError("must be true, false or 'all' (true recomputes just enough micro-batches to hold "
                             "what stock 1F1B holds, 'all' recomputes every one)")
        return value

    @model_validator(mode="after")
    def _recompute_needs_plus(self) -> "CheckFreeConfig":
        if self.plus_recompute_edges is not False and self.mode != "checkfree_plus":
            raise ValueError(f"plus_recompute_edges={self.plus_recompute_edges!r} recomputes the micro-batches that "
                             f"CheckFree+'s swapped routes make stages 0 and 1 hold, but mode={self.mode!r}. Set "
                             f"mode='checkfree_plus' or remove plus_recompute_edges.")
        return self

    @property
    def heartbeat_s(self) -> float:
        """The heartbeat interval in effect."""
        if self.heartbeat_interval_s is not None:
            return self.heartbeat_interval_s
        return min(1.0, self.detection_timeout_s / 4)

    def validate_for(self, num_stages: int) -> None:
        """Check the parts of the config that depend on the pipeline depth.

        Raises:
            ConfigError: with the rule, the values and the fix.
        """
        if not self.enabled:
            return
        if num_stages < 3:
            raise ConfigError(
                f"CheckFree rebuilds a stage from two neighbours, so it needs num_stages >= 3; the topology has "
                f"num_stages={num_stages}. Increase the pipeline degree or set checkfree.enabled=false.")
        if self.mode == "checkfree_plus" and num_stages < 4:
            raise ConfigError(
                f"CheckFree+ swaps the first two and the last two stages, so it needs num_stages >= 4; the "
                f"topology has num_stages={num_stages}. Increase the pipeline degree or use mode='checkfree'.")
        plan = self.failure_injection
        for i, failure in enumerate(plan.at):
            if failure.stage >= num_stages:
                raise ConfigError(
                    f"checkfree.failure_injection.at[{i}] names stage {failure.stage}, but the pipeline has "
                    f"stages 0..{num_stages - 1}. Use a stage id below num_stages={num_stages}.")
            if self.mode == "checkfree" and failure.stage in (0, num_stages - 1):
                raise ConfigError(
                    f"checkfree.failure_injection.at[{i}] loses stage {failure.stage}, an edge stage of a "
                    f"{num_stages}-stage pipeline; plain CheckFree can rebuild only stages 1..{num_stages - 2} "
                    f"(an edge stage has one neighbour). Set checkfree.mode='checkfree_plus' or pick a middle "
                    f"stage.")
        for stage in plan.stages or []:
            if not 0 <= stage < num_stages:
                raise ConfigError(
                    f"checkfree.failure_injection.stages lists stage {stage}, but the pipeline has stages "
                    f"0..{num_stages - 1}. Remove it or increase the pipeline degree.")
            if self.mode == "checkfree" and stage in (0, num_stages - 1):
                raise ConfigError(
                    f"checkfree.failure_injection.stages lists edge stage {stage}, which plain CheckFree cannot "
                    f"rebuild. Set checkfree.mode='checkfree_plus' or list only stages 1..{num_stages - 2}.")

    @classmethod
    def from_ds_config(cls, ds_config: Union[Mapping[str, Any], None]) -> "CheckFreeConfig":
        """Parse the ``"checkfree"`` section of a DeepSpeed config dict (absent section: disabled).

        The section is either a mapping or the path of a YAML/JSON file holding it.
        """
        section = (ds_config or {}).get(SECTION)
        if section is None:
            return cls()
        if isinstance(section, (str, os.PathLike)):
            # "checkfree": "path/to/checkfree.yaml" keeps the section in its own file.
            return load_config(section)
        return parse_section(section, source=f"{SECTION!r} section of the DeepSpeed config")


def format_validation_error(err: ValidationError, root: str = SECTION) -> str:
    """One ``root.key: message (got value)`` clause per pydantic error, joined by ``; ``."""
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item.get("loc", ()))
        msg = item.get("msg", "")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        value = item.get("input")
        shown = "" if isinstance(value, (Mapping, list)) else f" (got {value!r})"
        lines.append(f"{root}{'.' + loc if loc else ''}: {msg}{shown}")
    return "; ".join(lines)


def parse_section(section: Any, source: str = "checkfree section") -> CheckFreeConfig:
    """Validate a ``"checkfree"`` section given as a mapping.

    Raises:
        ConfigError: the section is not a mapping, has unknown keys or invalid values.
    """
    if not isinstance(section, Mapping):
        raise ConfigError(f"the {source} must be a mapping of keys to values, got {type(section).__name__}: "
                          f"{section!r}. Write it as {{\"enabled\": true, ...}}.")
    try:
        return CheckFreeConfig(**section)
    except ValidationError as err:
        raise ConfigError(f"invalid {source}: {format_validation_error(err)}") from None


def read_config_file(path: Union[str, os.PathLike], what: str) -> Any:
    """Read and parse a ``.json`` file as JSON, anything else as YAML (a superset of JSON).

    Raises:
        ConfigError: the file cannot be read (naming ``what`` and the path) or parsed.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read the {what} {str(p)!r}: {err.strerror or err}. Check the path.") from None
    try:
        if p.suffix == ".json":
            return json.loads(text)
        import yaml
        return yaml.safe_load(text)
    except Exception as err:  # json.JSONDecodeError, yaml.YAMLError
        raise ConfigError(f"cannot parse {str(p)!r}: {err}") from None


def load_config(path: Union[str, os.PathLike]) -> CheckFreeConfig:
    """Load the section from a JSON or YAML file.

    The file may hold either a whole DeepSpeed config (the ``"checkfree"`` key is used) or just the section.

    Raises:
        ConfigError: the file cannot be read or parsed, or its content is invalid.
    """
    p = Path(path)
    data = read_config_file(p, "CheckFree config file")
    if isinstance(data, Mapping) and SECTION in data:
        data = data[SECTION]
    return parse_section(data, source=f"CheckFree config {str(p)!r}")
