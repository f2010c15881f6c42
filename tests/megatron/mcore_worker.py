"""One rank of the megatron-core scenarios: train a real GPTModel pipeline on CPU/gloo, save it in Megatron's legacy and
torch_dist formats (plus the CheckFree sidecar), then for each scenario lose one stage's shard, repair it (online
hook or offline repair), load it into fresh megatron-core models with megatron.core's own APIs, check the weights,
and train on.

Run by tests/megatron/test_megatron_repair.py through tests/distributed/spawn.run_ranks; argument: a JSON spec
{"out": DIR, "num_layers": N, "steps": K, "scenarios": [{"name", "format", "lost", "repair"}]}.
Heavy imports live inside main(): dist_checkpointing starts a spawn-context process that re-imports this file.
"""
from __future__ import annotations

import json
import os
import sys

SEQ, VOCAB, HIDDEN, HEADS, MBS, MICRO = 32, 128, 32, 4, 2, 4
LR = 3e-3
EPS = 1e-4  # CheckFree's epsilon (recovery.source_weights)


def _inner(opt):
    """The torch optimizers inside a Megatron optimizer."""
    return [o.optimizer for o in getattr(opt, "chained_optimizers", [opt])]


def damage(it: str, fmt: str, stage: int, how: str) -> None:
    """Lose stage ``stage`` of iteration directory ``it``: delete its files, or write NaN into one of its tensors
    (bytes overwritten inside a record: the file still loads). TP = DP = 1, so its global rank is the stage."""
    import shutil

    import torch

    if how == "nan":
        if fmt == "legacy":
            path = os.path.join(it, f"mp_rank_00_{stage:03d}", "model_optim_rng.pt")
            state = torch.load(path, weights_only=False)
            next(v for k, v in state["model"].items() if k.endswith("linear_fc1.weight")).view(-1)[:1024] = float("nan")
            torch.save(state, path)
        else:  # overwrite one float tensor item of the stage's first file in place, keeping its length
            import io
            import pickle

            md = pickle.load(open(os.path.join(it, ".metadata"), "rb"))
            rel = f"__{stage}_0.distcp"
            index, info = next((i, v) for i, v in md.storage_data.items() if v.relative_path == rel and
                               i.offset is not None and "linear_fc1.weight" in i.fqn and "optimizer" not in i.fqn)
            with open(os.path.join(it, rel), "r+b") as f:
                f.seek(info.offset)
                t = torch.load(io.BytesIO(f.read(info.length)))
                t.view(-1)[:1024] = float("nan")
                buf = io.BytesIO()
                torch.save(t, buf)
                assert len(buf.getvalue()) == info.length
                f.seek(info.offset)
                f.write(buf.getvalue())
    elif fmt == "legacy":
        shutil.rmtree(os.path.join(it, f"mp_rank_00_{stage:03d}"))
    else:
        for name in os.listdir(it):
            if name.startswith(f"__{stage}_") and name.endswith(".distcp"):
                os.remove(os.path.join(it, name))
    # The lost node's sidecar goes with it.
    p = os.path.join(it, "checkfree", f"stage_{stage:03d}.json")
    if how == "delete" and os.path.exists(p):
        os.remove(p)


def main() -> None:
    import argparse
    import math
    import shutil
    import subprocess
    import time

    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tests.megatron import cpu_patches

    spec = json.loads(sys.argv[1])
    out = spec["out"]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cpu_patches.apply()

    from megatron.core import dist_checkpointing, parallel_state as ps, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    from deepspeed_checkfree.megatron.checkpoint import (CheckFreeState, record_norms_around_step,
                                                         repair_before_load, save_checkfree_state, state_after_load)
    from deepspeed_checkfree.megatron.training_hook import load_targets
    from deepspeed_checkfree.repair import repair_checkpoint

    rank, world = dist.get_rank(), dist.get_world_size()
    num_stages, num_layers = world, spec["num_layers"]
    ps.initialize_model_parallel(1, num_stages)
    stage = ps.get_pipeline_model_parallel_rank()
    tensor_parallel.model_parallel_cuda_manual_seed(1234)

    args = argparse.Namespace(
        num_layers=num_layers, hidden_size=HIDDEN, num_attention_heads=HEADS, seq_length=SEQ,
        max_position_embeddings=SEQ, padded_vocab_size=VOCAB, pipeline_model_parallel_size=num_stages,
        tensor_model_parallel_size=1, virtual_pipeline_model_parallel_size=None, pipeline_model_parallel_layout=None,
        decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
        untie_embeddings_and_output_weights=False, position_embedding_type="rope", expert_model_parallel_size=1,
        use_distributed_optimizer=False, ckpt_format="torch", micro_batch_size=MBS, lr=LR, iteration=0,
        consumed_train_samples=0, data_parallel_size=1, world_size=world)

    def build():
        cfg = TransformerConfig(num_layers=num_layers, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                pipeline_model_parallel_size=num_stages, use_cpu_initialization=True,
                                gradient_accumulation_fusion=False, pipeline_dtype=torch.float32,
                                hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
                                persist_layer_norm=False, masked_softmax_fusion=False, apply_rope_fusion=False)
        model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                         max_sequence_length=SEQ, pre_process=ps.is_pipeline_first_stage(),
                         post_process=ps.is_pipeline_last_stage(), position_embedding_type="rope",
                         share_embeddings_and_output_weights=True)
        ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(), model)
        cfg.finalize_model_grads_func = finalize_model_grads
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=LR, min_lr=LR / 10, weight_decay=0.01,
                                                     clip_grad=0.0),
                                     [ddp])
        sched = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=LR, min_lr=LR / 10, lr_warmup_steps=2,
                                        lr_decay_steps=100, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
                                        wd_incr_steps=100, wd_incr_style="constant")
        return model, ddp, opt, sched

    def batches(step):
        g = torch.Generator().manual_seed(1000 + step)
        for _ in range(MICRO):
            yield torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)

    def forward_step(data_iterator, model):
        toks = next(data_iterator)
        pos = torch.arange(SEQ).unsqueeze(0).expand(MBS, -1)
        output = model(toks[:, :-1], pos, None, labels=toks[:, 1:])

        def loss_func(output_tensor):
            loss = output_tensor.float().mean()
            return loss, {"lm loss": loss.clone().detach()}

        return output, loss_func

    fb = get_forward_backward_func()

    def train(ddp, opt, sched, state, first_step, n):
        record_norms_around_step(opt, [ddp], state)
        losses = []
        for step in range(first_step, first_step + n):
            ddp.zero_grad_buffer()
            opt.zero_grad()
            reduced = fb(forward_step_func=forward_step, data_iterator=batches(step), model=[ddp],
                         num_microbatches=MICRO, seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
            opt.step()
            sched.step(increment=MBS * MICRO)
            if reduced:
                losses.append(float(sum(r["lm loss"] for r in reduced) / len(reduced)))
        return losses

    def rng_state():
        import random

        import numpy as np
        return [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                 "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
                 "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}]

    # ---- phase 1: train and save ------------------------------------------------------------------------------
    t0 = time.time()
    model, ddp, opt, sched = build()
    state = CheckFreeState()
    steps = spec["steps"]
    train(ddp, opt, sched, state, 0, steps)
    # The recorded stage norm, recomputed here from the gradients the last step used (Megatron DDP's main_grad).
    own_norm = float(sum(p.main_grad.float().pow(2).sum() for p in ddp.parameters()) ** 0.5)
    saved = {k: v.detach().clone() for k, v in model.state_dict_for_save_checkpoint().items()
             if isinstance(v, torch.Tensor)}
    saved_opt = {i: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
                 for i, s in opt.state_dict()["state"].items()}
    norms = [None] * num_stages
    dist.all_gather_object(norms, state.grad_norm)
    all_saved = [None] * num_stages
    dist.all_gather_object(all_saved, saved)

    pristine = {"legacy": os.path.join(out, "pristine_legacy"), "torch_dist": os.path.join(out, "pristine_dist")}
    iter_name = f"iter_{steps:07d}"
    # Legacy layout, as megatron/training/checkpointing.py generate_state_dict + torch.save write it.
    legacy_iter = os.path.join(pristine["legacy"], iter_name)
    shard = os.path.join(legacy_iter, f"mp_rank_00_{stage:03d}", "model_optim_rng.pt")
    os.makedirs(os.path.dirname(shard), exist_ok=True)
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": steps,
                "model": model.state_dict_for_save_checkpoint(), "optimizer": opt.state_dict(),
                "opt_param_scheduler": sched.state_dict(), "rng_state": rng_state(),
                "num_floating_point_operations_so_far": 0}, shard)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(pristine["legacy"], "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(steps))
    save_checkfree_state(legacy_iter, [ddp], state, steps)
    # torch_dist layout, written by megatron.core dist_checkpointing as Megatron-LM's save_checkpoint calls it.
    dist_iter = os.path.join(pristine["torch_dist"], iter_name)
    if rank == 0:
        os.makedirs(dist_iter, exist_ok=True)
    dist.barrier()
    dargs = argparse.Namespace(**{**vars(args), "ckpt_format": "torch_dist"})
    sd = {"model": model.sharded_state_dict()}
    sd["optimizer"] = opt.sharded_state_dict(sd)
    sd.update(args=dargs, checkpoint_version=3.0, iteration=steps, opt_param_scheduler=sched.state_dict(),
              num_floating_point_operations_so_far=0,
              rng_state=ShardedObject("rng_state", rng_state(), (num_stages, 1), (stage, 0), replica_id=0))
    dist_checkpointing.save(sd, dist_iter)
    if rank == 0:
        with open(os.path.join(pristine["torch_dist"], "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(steps))
    save_checkfree_state(dist_iter, [ddp], state, steps)
    setup_s = time.time() - t0
    del model, ddp, opt, sched

    # ---- phase 2: lose a stage, repair, load, check, train on --------------------------------------------------
    for sc in spec["scenarios"]:
        t1 = time.time()
        fmt, lost, how = sc["format"], sc["lost"], sc["repair"]
        work = os.path.join(out, sc["name"])
        load_dir = work
        report = None
        if rank == 0:
            shutil.copytree(pristine[fmt], work)
            it = os.path.join(work, iter_name)
            if sc.get("ckpt_step"):
                # An older iteration, loaded with --ckpt-step, is the damaged one; the latest stays intact.
                older = os.path.join(work, f"iter_{steps - 1:07d}")
                shutil.copytree(it, older)
                it = older
            damage(it, fmt, lost, sc.get("damage", "delete"))
        dist.barrier()
        it_name = f"iter_{steps - 1:07d}" if sc.get("ckpt_step") else iter_name
        if how == "online":
            # The targets the Megatron-LM hook computes from --load / --ckpt-step.
            margs = argparse.Namespace(load=work, ckpt_step=steps - 1 if sc.get("ckpt_step") else None,
                                       pretrained_checkpoint=None, non_persistent_ckpt_type=None)
            reports = repair_before_load(load_targets(margs), events_file=os.path.join(out, "events.jsonl"))
            report = reports[0] if reports else None
        else:
            load_dir = work + "-repaired"
            if rank == 0:
                if how == "cli":
                    proc = subprocess.run(
                        [sys.executable, "-m", "deepspeed_checkfree.cli", "repair", work, "--output", load_dir,
                         "--json", "--events-file", os.path.join(out, "events.jsonl")],
                        capture_output=True, text=True, timeout=120)
                    if proc.returncode != 0:
                        raise RuntimeError(f"checkfree repair failed ({proc.returncode}): {proc.stderr}")
                    report = json.loads(proc.stdout)
                else:
                    report = repair_checkpoint(work, output=load_dir).to_json()
            dist.barrier()

        model, ddp, opt, sched = build()
        it_dir = os.path.join(load_dir, it_name)
        if fmt == "legacy":
            loaded = torch.load(os.path.join(it_dir, f"mp_rank_00_{stage:03d}", "model_optim_rng.pt"),
                                weights_only=False)
            ddp.load_state_dict(loaded["model"], strict=True)
            opt.load_state_dict(loaded["optimizer"])
            sched.load_state_dict(loaded["opt_param_scheduler"])
            iteration = loaded["iteration"]
        else:
            sd = {"model": model.sharded_state_dict()}
            sd["optimizer"] = opt.sharded_state_dict(sd, is_loading=True)
            sd.update(iteration=None, opt_param_scheduler=None)
            loaded = dist_checkpointing.load(sd, it_dir)
            model.load_state_dict(loaded["model"], strict=True)
            opt.load_state_dict(loaded["optimizer"])
            sched.load_state_dict(loaded["opt_param_scheduler"])
            iteration = loaded["iteration"]
        now = {k: v.detach().clone() for k, v in model.state_dict_for_save_checkpoint().items()
               if isinstance(v, torch.Tensor)}
        # What the hook does after Megatron's loader: a stage rebuilt now restarts with a fresh optimizer state.
        # (every rank gets the same reports in the hook; LR boost 1.0 keeps updates comparable across formats)
        state_after_load(None, iteration, [{"rebuilds": [{"stage": lost}]}], CheckFreeState(), 1.0, opt)
        result = {"name": sc["name"], "rank": rank, "stage": stage, "lost": lost, "iteration": iteration,
                  "keys_equal": sorted(now) == sorted(saved) if stage != lost else None, "norms": norms,
                  "setup_s": setup_s, "own_norm": own_norm}
        if stage == lost:
            # The expected rebuild, computed here from the neighbours' pre-failure weights and recorded norms.
            if 0 < lost < num_stages - 1:
                prev, nxt = all_saved[lost - 1], all_saved[lost + 1]
                w = [norms[lost - 1] + EPS, norms[lost + 1] + EPS]
                w = [x / sum(w) for x in w]
                expected = {k: (prev[k].float() * w[0] + nxt[k].float() * w[1]) for k in prev if "layers" in k}
                result["weights"] = w
            else:
                src = all_saved[1 if lost == 0 else num_stages - 2]
                own = all_saved[lost]
                expected = {k: src[k] for k in src if k.startswith("decoder.layers.")}
                expected.update({k: own[k] for k in own if not k.startswith("decoder.layers.")})
            result["expected_keys_equal"] = sorted(expected) == sorted(now)
            result["max_diff_rebuilt"] = max(float((now[k] - expected[k]).abs().max()) for k in expected)
            result["optimizer_state_entries"] = sum(
                1 for s in opt.state_dict()["state"].values()
                for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0 and bool(v.abs().sum() > 0))
        else:
            result["max_diff_others"] = max(float((now[k] - saved[k]).abs().max()) for k in saved)
            cur = opt.state_dict()["state"]
            result["max_diff_optimizer"] = max(
                float((cur[i][k] - v).abs().max()) for i, s in saved_opt.items() for k, v in s.items()
                if k in cur.get(i, {}) and v.dim() > 0)
        cont = CheckFreeState()
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        result["losses_after"] = train(ddp, opt, sched, cont, steps, 1)
        # The rebuilt stage's first update, compared across formats by the test.
        torch.save({k: v.detach() - before[k] for k, v in model.named_parameters()},
                   os.path.join(out, f"{sc['name']}-rank{rank}-update.pt"))
        result["adam_steps_after"] = sorted({float(st["step"]) for o in _inner(opt) for st in o.state.values()})
        result["losses_after"] += train(ddp, opt, sched, cont, steps + 1, 1)
        result["finite"] = all(math.isfinite(x) for x in result["losses_after"])
        if report is not None:
            result["report"] = report
        result["seconds"] = time.time() - t1
        with open(os.path.join(out, f"{sc['name']}-rank{rank}.json"), "w") as f:
            json.dump(result, f, default=str)
        del model, ddp, opt, sched
        dist.barrier()
    if spec.get("variants"):
        from tests.megatron.mcore_variants import run_variants

        run_variants(spec, out, damage, rng_state)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
