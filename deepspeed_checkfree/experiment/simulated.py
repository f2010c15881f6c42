"""The pipeline simulated in one process, as the paper's experiments do: per-stage layers and optimizers, losing a
stage, and rebuilding it with the same decisions and math as the real engine.

Every rule the engine also follows comes from :mod:`..core.recovery` (which sources, which weights, which layers
match, the blend, the per-stage clip, the random-rebuild seed, the LR boost, which replica is authoritative), and
CheckFree+ routes from :func:`..core.schedule.route`. What the engine does across ranks happens here on one device and
in the same order: per-micro-batch loss scaled by the accumulation steps, (de)embedding replicas whose gradients
are summed, each stage's gradient norm measured (and clipped) before its optimizer step, and a rebuilt edge copy
that follows the surviving copy afterwards. The distributed test checks both paths agree.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..core.recovery import (RecoveryPlan, StageSignature, blend_state, boosted_lrs, clip_stage_grads_,
                             layer_signature, match_layers, plan_recovery, random_rebuild_seed, reinitialize,
                             source_weights, tied_authorities)
from ..core.schedule import route
from ..models import llama
from ..models.corpus import StepBatches, load_corpus, split_corpus
from ..pipe.plus_module import EMBED_KEY, HEAD_KEY
from .config import ExperimentConfig


@dataclass
class StageLayer:
    """One layer of a stage: its name, module and ``TiedLayerSpec`` key (None unless it is a replicated edge)."""

    name: str
    module: nn.Module
    tied_key: Optional[str] = None


@functools.lru_cache(maxsize=2)
def _split(corpus: Optional[str], val_fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    # Decompressing the corpus takes about a second; every strategy of a run reads the same one.
    return split_corpus(load_corpus(corpus), val_fraction=val_fraction)


def data_streams(cfg: ExperimentConfig) -> Tuple[StepBatches, List[Tuple[torch.Tensor, torch.Tensor]]]:
    """The training batches (addressed by step and micro-batch) and the fixed validation micro-batches."""
    train, val = _split(cfg.data.corpus, cfg.data.val_fraction)
    t, m = cfg.training, cfg.model
    batches = StepBatches(train, m.seq_len, t.micro_batch_size, t.micro_batches, seed=cfg.data.seed)
    val_batches = StepBatches(val, m.seq_len, t.micro_batch_size, t.eval_batches, seed=cfg.data.seed + 1)
    return batches, [val_batches.get(0, i) for i in range(t.eval_batches)]


def build_layers(cfg: ExperimentConfig) -> Tuple[nn.Module, List[nn.Module], nn.Module]:
    """The model's initial layers (embedding, blocks, head), seeded by ``training.seed`` alone, so every strategy
    and both backends start from the same weights. The global RNG is left as it was."""
    lcfg = cfg.model.llama()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.training.seed)
        embedding = llama.LlamaEmbedding(lcfg)
        blocks = [llama.LlamaBlock(lcfg) for _ in range(lcfg.n_layers)]
        head = llama.LlamaHead(lcfg)
    return embedding, blocks, head


def stage_layout(cfg: ExperimentConfig, mode: str) -> List[List[StageLayer]]:
    """Each stage's layers in the engine's order (embedding, blocks, head), from :func:`build_layers`.

    Under CheckFree+ stage 1 also holds a copy of the embedding and stage P-2 a copy of the head, keyed like the
    engine's ``TiedLayerSpec``s so that recovery matches them by key.
    """
    plus = mode == "checkfree_plus"
    embedding, blocks, head = build_layers(cfg)
    per, p = cfg.model.layers_per_stage, cfg.model.num_stages
    stages: List[List[StageLayer]] = []
    for s in range(p):
        layers: List[StageLayer] = []
        if s == 0 or (plus and s == 1):
            layers.append(StageLayer("embed", embedding if s == 0 else copy.deepcopy(embedding),
                                     EMBED_KEY if plus else None))
        layers += [StageLayer(f"block{s * per + i}", blocks[s * per + i]) for i in range(per)]
        if s == p - 1 or (plus and s == p - 2):
            layers.append(StageLayer("head", head if s == p - 1 else copy.deepcopy(head), HEAD_KEY if plus else None))
        stages.append(layers)
    return stages


class SimulatedPipeline:
    """A ``num_stages``-deep pipeline of the experiment's model in one process.

    Args:
        cfg: the experiment.
        mode: ``checkfree`` (stage 0 holds the embedding, stage P-1 the head) or ``checkfree_plus`` (stage 1 and
            stage P-2 also hold replicas, and odd micro-batches run swapped routes).
        strategy: how lost middle stages are rebuilt (for ``lose_and_rebuild``).
    """

    def __init__(self, cfg: ExperimentConfig, mode: str = "checkfree", strategy: str = "gradnorm_average") -> None:
        self.cfg = cfg
        self.mode = mode
        self.strategy = strategy
        self.num_stages = cfg.model.num_stages
        self.plus = mode == "checkfree_plus"
        self.device = torch.device(cfg.training.device)
        self.batches, self.val = data_streams(cfg)
        self.stages = stage_layout(cfg, mode)
        p = self.num_stages
        for layers in self.stages:
            for layer in layers:
                layer.module.to(self.device)
        t = cfg.training
        self.optimizers = [torch.optim.AdamW(self.stage_params(s), lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps,
                                             weight_decay=t.weight_decay) for s in range(p)]
        self.lr_scale = [1.0] * p
        self.grad_norms: List[Optional[float]] = [None] * p
        # Tied key -> stage whose copy is authoritative after an edge rebuild (see recovery.tied_authorities).
        self.tied_authority: Dict[str, int] = {}
        self.signatures: Dict[int, StageSignature] = {s: self._signature(s) for s in range(p)}
        # Tied key -> the stages holding a copy (CheckFree+: the embedding on 0 and 1, the head on P-2 and P-1).
        self.tied_groups: Dict[str, List[int]] = {}
        for s, layers in enumerate(self.stages):
            for layer in layers:
                if layer.tied_key is not None:
                    self.tied_groups.setdefault(layer.tied_key, []).append(s)
        self._checkpoint: Optional[dict] = None
        self._replica: Optional[dict] = None

    # ------------------------------------------------------------------------------------------------------
    # Structure
    # ------------------------------------------------------------------------------------------------------

    def stage_params(self, stage: int) -> List[nn.Parameter]:
        return [p for layer in self.stages[stage] for p in layer.module.parameters()]

    def named_stage_params(self, stage: int) -> Dict[str, nn.Parameter]:
        return {f"{l.name}.{n}": p for l in self.stages[stage] for n, p in l.module.named_parameters()}

    def _signature(self, stage: int) -> StageSignature:
        return tuple(layer_signature(l.name, l.module, l.tied_key) for l in self.stages[stage])

    def _layer(self, stage: int, name: str) -> nn.Module:
        return next(l.module for l in self.stages[stage] if l.name == name)

    def blocks(self, stage: int) -> List[nn.Module]:
        """The transformer blocks of ``stage``, in order."""
        return [l.module for l in self.stages[stage] if l.name.startswith("block")]

    def stage_bytes(self) -> int:
        """Bytes of the largest stage's weights."""
        return max(sum(p.numel() * p.element_size() for p in self.stage_params(s)) for s in range(self.num_stages))

    def _tied_module(self, key: str, stage: int) -> nn.Module:
        return next(l.module for l in self.stages[stage] if l.tied_key == key)

    # ------------------------------------------------------------------------------------------------------
    # Training and evaluation
    # ------------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
        """Run ``x`` through the stages in ``order``: the first embeds, the last applies the head."""
        h = self._layer(order[0], "embed")(x)
        for s in order:
            for block in self.blocks(s):
                h = block(h)
        return self._layer(order[-1], "head")(h)

    def _route(self, micro_batch_id: int) -> Sequence[int]:
        return route(micro_batch_id, self.num_stages) if self.plus else range(self.num_stages)

    def train_step(self, step: int) -> float:
        """One iteration on the batches of training step ``step``; returns the mean micro-batch loss."""
        p, m = self.num_stages, self.cfg.training.micro_batches
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for mb in range(m):
            x, y = (t.to(self.device) for t in self.batches.get(step, mb))
            loss = llama.lm_loss(self.forward(x, self._route(mb)), y)
            # DeepSpeed scales each micro-batch's loss by the accumulation steps before its backward.
            (loss / m).backward()
            total += loss.detach()
        with torch.no_grad():
            # DeepSpeed's ReduceTiedGrads: every copy of a replicated layer gets the sum of the copies' gradients.
            for key, members in self.tied_groups.items():
                mods = [self._tied_module(key, s) for s in members]
                for params in zip(*(mod.parameters() for mod in mods)):
                    grads = [q.grad for q in params if q.grad is not None]
                    if not grads:
                        continue
                    summed = grads[0].clone()
                    for g in grads[1:]:
                        summed += g
                    for q in params:
                        q.grad = summed.clone()
            clip = self.cfg.training.per_stage_clip
            for s in range(p):
                grads = [q.grad for q in self.stage_params(s) if q.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads, 2.0) if grads else torch.zeros((), device=self.device)
                if clip is not None:
                    norm = clip_stage_grads_(grads, norm, clip)
                self.grad_norms[s] = float(norm)
            for opt in self.optimizers:
                opt.step()
            self._sync_tied_copies()
        return float(total / m)

    def _sync_tied_copies(self) -> None:
        """After an edge rebuild the surviving copy is authoritative: the other copy takes its values each step."""
        for key, src in self.tied_authority.items():
            authority = self._tied_module(key, src)
            for s in self.tied_groups[key]:
                if s != src:
                    for q, a in zip(self._tied_module(key, s).parameters(), authority.parameters()):
                        q.copy_(a)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation micro-batches, along the default route (as the engine's eval)."""
        losses = [llama.lm_loss(self.forward(x.to(self.device), range(self.num_stages)), y.to(self.device))
                  for x, y in self.val]
        return float(torch.stack(losses).mean())

    # ------------------------------------------------------------------------------------------------------
    # Failures
    # ------------------------------------------------------------------------------------------------------

    def _set_lr(self, stage: int) -> None:
        groups = self.optimizers[stage].param_groups
        # The LR is constant, so the scheduled LRs are training.lr.
        for g, lr in zip(groups, boosted_lrs([self.cfg.training.lr] * len(groups), self.lr_scale[stage])):
            g["lr"] = lr

    def wipe(self, lost: Sequence[int]) -> None:
        """What losing a stage loses: its weights (NaN, so a leak shows), optimizer state and gradient norm."""
        with torch.no_grad():
            for s in lost:
                for q in self.stage_params(s):
                    q.fill_(math.nan)
                    q.grad = None
                self.optimizers[s].state.clear()
                self.grad_norms[s] = None

    def lose_and_rebuild(self, lost: Sequence[int], step: int) -> Tuple[RecoveryPlan, ...]:
        """Lose ``lost`` and rebuild each from the survivors as the engine does (plans, weights, blend, optimizer
        reset, LR boost, tied authority).

        Raises:
            RecoveryError: a lost stage cannot be rebuilt (before anything is lost).
        """
        t = self.cfg.training
        plans = plan_recovery(lost, self.num_stages, self.mode, self.strategy, t.on_adjacent_failure)
        norms_before = list(self.grad_norms)
        self.wipe(lost)
        with torch.no_grad():
            for plan in sorted(plans, key=lambda pl: pl.target):
                target = plan.target
                if plan.strategy == "random":
                    reinitialize([l.module for l in self.stages[target]], random_rebuild_seed(t.seed, step, target))
                else:
                    mappings = [match_layers(self.signatures[target], self.signatures[src], target, src)
                                for src in plan.sources]
                    weights, _ = source_weights(plan, [norms_before[src] for src in plan.sources], eps=t.eps,
                                                norm=t.norm)
                    values = blend_state([self.named_stage_params(src) for src in plan.sources], mappings, weights)
                    params = self.named_stage_params(target)
                    for name, value in values.items():
                        params[name].copy_(value)
                # A second rebuild of the same stage sets boost x base LR again; it does not compound.
                self.lr_scale[target] = t.lr_boost
                self._set_lr(target)
        self.tied_authority.update(tied_authorities(plans, self.signatures))
        return plans

    def _state(self) -> dict:
        return {"params": [[q.detach().clone() for q in self.stage_params(s)] for s in range(self.num_stages)],
                "optimizers": [copy.deepcopy(opt.state_dict()) for opt in self.optimizers],
                "lr_scale": list(self.lr_scale), "grad_norms": list(self.grad_norms),
                "tied_authority": dict(self.tied_authority)}

    def _load_state(self, state: dict, stages: Sequence[int]) -> None:
        with torch.no_grad():
            for s in stages:
                for q, v in zip(self.stage_params(s), state["params"][s]):
                    q.copy_(v)
                    q.grad = None
                self.optimizers[s].load_state_dict(copy.deepcopy(state["optimizers"][s]))
                self.lr_scale[s] = state["lr_scale"][s]
                self.grad_norms[s] = state["grad_norms"][s]
        if len(stages) == self.num_stages:
            self.tied_authority = dict(state["tied_authority"])

    def save_checkpoint(self, step: int) -> None:
        """Keep the whole model, every optimizer state and the step (the checkpointing baseline's storage)."""
        self._checkpoint = {"step": step, **self._state()}

    def checkpoint(self) -> Optional[dict]:
        """The last checkpoint (step, per-stage parameters and optimizer states), for tests."""
        return self._checkpoint

    def rollback(self, lost: Sequence[int]) -> int:
        """Lose ``lost``, then restore every stage from the last checkpoint; returns the checkpoint's step."""
        assert self._checkpoint is not None, "the checkpointing strategy saves a checkpoint at step 0"
        self.wipe(lost)
        self._load_state(self._checkpoint, range(self.num_stages))
        return self._checkpoint["step"]

    def update_replica(self) -> None:
        """Redundant computation: the neighbour's copy of every stage is current after each step."""
        self._replica = self._state()

    def restore_from_replica(self, lost: Sequence[int]) -> None:
        """Lose ``lost`` and restore them exactly (weights and optimizer state) from the neighbours' copies."""
        assert self._replica is not None, "update_replica runs before the first failure can happen"
        self.wipe(lost)
        self._load_state(self._replica, lost)

    def state_arrays(self) -> Dict[str, np.ndarray]:
        """Every stage's parameters as numpy arrays (for tests comparing runs)."""
        return {f"stage{s}.{n}": q.detach().cpu().numpy().copy() for s in range(self.num_stages)
                for n, q in self.named_stage_params(s).items()}
