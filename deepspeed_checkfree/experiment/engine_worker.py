"""One rank of the ``deepspeed`` backend: the experiment's strategies on the real CheckFree engine.

    python -m deepspeed_checkfree.experiment.engine_worker JOB.json     # started by engine_launch, once per stage

Every rank runs :func:`.strategies.run_strategy` with the same plan, so the rebuild, checkpoint and eval
collectives line up. The engine starts from the simulated pipeline's initial weights, so the two backends train
the same model. Rank 0 prints ``progress N`` lines and writes each strategy's records as JSON.
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from deepspeed import ops as ds_ops
from deepspeed.accelerator import get_accelerator

if get_accelerator().device_name() == "cpu":
    # The CPU-only shm all-reduce op would be JIT-compiled (~100 s) at init; training never uses it.
    ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

import deepspeed_checkfree  # noqa: E402,F401  (registers the CheckFree engine)
from ..models import llama  # noqa: E402
from ..pipe.engine import stage_layers  # noqa: E402
from ..pipe.plus_module import EdgeReplica  # noqa: E402
from .config import ExperimentConfig, StrategySpec, from_dict  # noqa: E402
from .simulated import data_streams, stage_layout  # noqa: E402
from .strategies import needs_mode, run_strategy  # noqa: E402


def ds_config(cfg: ExperimentConfig, spec: StrategySpec) -> dict:
    """The DeepSpeed config of one strategy: fp32, torch AdamW, no DeepSpeed clipping (the CheckFree section's
    per_stage_clip clips each stage, as the simulated pipeline does)."""
    t = cfg.training
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.micro_batches,
        "steps_per_print": 10 ** 9,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.adam_eps,
                                                  "weight_decay": t.weight_decay, "torch_adam": True}},
        "checkfree": cfg.checkfree_section(spec),
    }


class EngineBackend:
    """The :class:`.strategies.Backend` interface over a real ``CheckFreeEngine`` (one rank of it)."""

    def __init__(self, cfg: ExperimentConfig, spec: StrategySpec, workdir: Path) -> None:
        self.cfg = cfg
        mode, _ = needs_mode(spec)
        lcfg = cfg.model.llama()
        p = cfg.model.num_stages
        module = llama.plus_pipeline_module(lcfg, p) if mode == "checkfree_plus" else llama.pipeline_module(lcfg, p)
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, config=ds_config(cfg, spec),
            model_parameters=[q for q in module.parameters() if q.requires_grad])
        self.stage_id = self.engine.stage_id
        self._load_initial_weights(mode)
        self.batches, val = data_streams(cfg)
        self.val = list(val)
        self.ckpt_dir = workdir / f"ckpt-{spec.name}"
        self._ckpt_tag: Optional[str] = None
        self._replica: Optional[dict] = None

    def _load_initial_weights(self, mode: str) -> None:
        sim = stage_layout(self.cfg, mode)[self.stage_id]
        mine = stage_layers(self.engine.module)
        assert len(sim) == len(mine), f"stage {self.stage_id}: {len(mine)} engine layers vs {len(sim)} simulated"
        with torch.no_grad():
            for (_, module, _), layer in zip(mine, sim):
                target = module.layer if isinstance(module, EdgeReplica) else module
                target.load_state_dict(layer.module.state_dict())

    def train_step(self, step: int) -> float:
        return float(self.engine.train_batch(self.batches.iterator(step)))

    def evaluate(self) -> float:
        return float(self.engine.eval_batch(iter(self.val), num_micro_batches=len(self.val)))

    def lose_and_rebuild(self, lost: Sequence[int], step: int) -> object:
        return self.engine.lose_and_rebuild(lost, cause="injected")

    def _wipe_if_lost(self, lost: Sequence[int]) -> None:
        if self.stage_id in lost:
            with torch.no_grad():
                for q in self.engine.module.parameters():
                    q.fill_(math.nan)
            self.engine.basic_optimizer.state.clear()

    def save_checkpoint(self, step: int) -> None:
        """DeepSpeed's own checkpoint (every rank writes its stage), then the previous one is removed."""
        tag = f"step{step}"
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state={"checkfree_step": step})
        dist.barrier()
        if self._ckpt_tag is not None and dist.get_rank() == 0:
            shutil.rmtree(self.ckpt_dir / self._ckpt_tag, ignore_errors=True)
        self._ckpt_tag = tag

    def rollback(self, lost: Sequence[int]) -> int:
        self._wipe_if_lost(lost)
        _, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=self._ckpt_tag)
        return int(client["checkfree_step"])

    def update_replica(self) -> None:
        # Stands in for the copy the neighbour keeps under redundant computation (its cost is in the clock).
        self._replica = {"module": {k: v.detach().clone() for k, v in self.engine.module.state_dict().items()},
                         "optimizer": copy.deepcopy(self.engine.basic_optimizer.state_dict())}

    def restore_from_replica(self, lost: Sequence[int]) -> None:
        self._wipe_if_lost(lost)
        if self.stage_id in lost:
            assert self._replica is not None
            self.engine.module.load_state_dict(self._replica["module"])
            self.engine.basic_optimizer.load_state_dict(copy.deepcopy(self._replica["optimizer"]))

    def close(self) -> None:
        if dist.get_rank() == 0:
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        del self.engine


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    cfg = from_dict(job["config"])
    out = Path(job["out"])
    torch.set_num_threads(int(job.get("threads", 1)))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    rank = dist.get_rank()
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    plan = cfg.failure_plan()
    for name in job["strategies"]:
        spec = next(s for s in cfg.strategies if s.name == name)
        backend = EngineBackend(cfg, spec, out)

        def progress(n: int, _name: str = name) -> None:
            if rank == 0:
                print(f"progress {_name} {n}", flush=True)

        result = run_strategy(cfg, spec, backend, plan, progress=progress)
        if rank == 0:
            (out / f"engine-{name}.json").write_text(json.dumps(result.as_dict()) + "\n")
        backend.close()
        del backend
        gc.collect()
        dist.barrier()


if __name__ == "__main__":
    main()
