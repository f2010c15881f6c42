"""The Megatron settings beyond one plain block of layers per rank, run inside mcore_worker's process group after its
scenarios: the distributed optimizer and virtual pipeline stages (VPP). For each: train a real megatron-core GPT on
CPU/gloo, save it in the legacy and torch_dist formats with the CheckFree sidecar, then

* intact: the hook's ``repair_before_load`` must leave it alone, and megatron.core's loader must get back exactly
  what was saved (weights and optimizer state);
* one stage lost: the hook either rebuilds it (then the rebuilt weights are compared with the blend computed here
  from the neighbours' pre-failure weights, and the stage's Adam state must be fresh) or refuses with an error that
  names the setting and the ways on.

Each case writes ``<name>-rank<r>.json`` for tests/megatron/test_megatron_settings.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

SEQ, VOCAB, HIDDEN, HEADS, MBS, MICRO = 32, 128, 32, 4, 2, 4
LR = 3e-3


def expected_diff(now, all_saved, norms, lost, num_stages, vpp):
    """Max |rebuilt - expected| over the lost rank's chunks, the expected rebuild computed here from the neighbours'
    pre-failure weights: chunk c of rank s is virtual stage v = c * P + s, rebuilt from virtual stages v - 1 and
    v + 1 weighted by their ranks' gradient norms (+1e-4), or copied from its one neighbour at either end of the
    virtual pipeline (its own embedding/head come from the replica, i.e. equal its pre-failure values)."""
    total, plan, worst = num_stages * vpp, [], 0.0
    key = (lambda c: f"model{c}") if vpp > 1 else (lambda c: "model")
    own = all_saved[lost]
    for c in range(vpp):
        v = c * num_stages + lost
        srcs = [v - 1, v + 1] if 0 < v < total - 1 else [1 if v == 0 else total - 2]
        where = [(u % num_stages, u // num_stages) for u in srcs]
        w = [norms[s] + 1e-4 for s, _ in where] if len(srcs) == 2 else [1.0]
        w = [x / sum(w) for x in w]
        plan.append({"chunk": c, "virtual_stage": v, "sources": where, "weights": w})
        for k, value in now[key(c)].items():
            if k.startswith("decoder.layers."):
                exp = sum(wi * all_saved[s][key(cc)][k].float() for wi, (s, cc) in zip(w, where))
            else:
                exp = own[key(c)][k]
            worst = max(worst, float((value - exp).abs().max()))
    return worst, plan


def claim_args(it: str, fmt: str, changes: dict) -> None:
    """Rewrite the saved args of every file that holds them (all the hook knows of a setting like a custom
    pipeline layout): each legacy shard, or the torch_dist common state (common.pt up to megatron.core 0.16; from
    0.19 the ``common_state`` item of global rank 0's file, rewritten at the file's end and re-pointed in .metadata,
    and the hook's replica of it)."""
    import glob
    import io
    import pickle

    import torch

    if fmt != "torch_dist" or os.path.exists(os.path.join(it, "common.pt")):
        files = [os.path.join(it, "common.pt")] if fmt == "torch_dist" else \
            glob.glob(os.path.join(it, "mp_rank_*", "model_optim_rng.pt"))
        for f in files:
            state = torch.load(f, weights_only=False)
            vars(state["args"]).update(changes)
            torch.save(state, f)
        return
    md_path = os.path.join(it, ".metadata")
    with open(md_path, "rb") as f:
        md = pickle.load(f)
    index = next(i for i in md.storage_data if i.fqn == "common_state/shard_0_1")
    info = md.storage_data[index]
    with open(os.path.join(it, info.relative_path), "r+b") as f:
        f.seek(info.offset)
        (state,) = torch.load(io.BytesIO(f.read(info.length)), weights_only=False)
        vars(state["args"]).update(changes)
        buf = io.BytesIO()
        torch.save([state], buf)
        f.seek(0, os.SEEK_END)
        md.storage_data[index] = type(info)(info.relative_path, f.tell(), len(buf.getvalue()))
        f.write(buf.getvalue())
    with open(md_path, "wb") as f:
        pickle.dump(md, f)
    replica = os.path.join(it, "checkfree", "common_state_replica.bin")
    if os.path.exists(replica):
        with open(replica, "wb") as f:
            f.write(buf.getvalue())


def run_variants(spec: dict, out: str, damage, rng_state_of) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state as ps, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    from deepspeed_checkfree.errors import RecoveryError
    from deepspeed_checkfree.megatron.checkpoint import (CheckFreeState, record_norms_around_step,
                                                         repair_before_load, save_checkfree_state, state_after_load)

    rank, world = dist.get_rank(), dist.get_world_size()
    num_stages, num_layers = world, spec["num_layers"]

    for variant in spec["variants"]:
        vpp, distopt = variant.get("vpp", 1), variant.get("distributed_optimizer", False)
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(1, num_stages, virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        stage = ps.get_pipeline_model_parallel_rank()
        args = argparse.Namespace(
            num_layers=num_layers, hidden_size=HIDDEN, num_attention_heads=HEADS, seq_length=SEQ,
            max_position_embeddings=SEQ, padded_vocab_size=VOCAB, pipeline_model_parallel_size=num_stages,
            tensor_model_parallel_size=1, virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
            pipeline_model_parallel_layout=None, decoder_first_pipeline_num_layers=None,
            decoder_last_pipeline_num_layers=None, untie_embeddings_and_output_weights=False,
            position_embedding_type="rope", expert_model_parallel_size=1, use_distributed_optimizer=distopt,
            ckpt_format="torch", micro_batch_size=MBS, lr=LR, iteration=0, data_parallel_size=1, world_size=world)

        def build():
            cfg = TransformerConfig(num_layers=num_layers, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                    pipeline_model_parallel_size=num_stages,
                                    virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
                                    use_cpu_initialization=True, gradient_accumulation_fusion=False,
                                    pipeline_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
                                    bias_dropout_fusion=False, persist_layer_norm=False, masked_softmax_fusion=False,
                                    apply_rope_fusion=False)
            chunks = [GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                               max_sequence_length=SEQ, position_embedding_type="rope",
                               pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=c),
                               post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=c),
                               share_embeddings_and_output_weights=True, vp_stage=c if vpp > 1 else None)
                      for c in range(vpp)]
            ddps = [DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=distopt), m,
                                            disable_bucketing=c > 0) for c, m in enumerate(chunks)]
            cfg.finalize_model_grads_func = finalize_model_grads
            opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.01, clip_grad=0.0,
                                                         use_distributed_optimizer=distopt), ddps)
            return chunks, ddps, opt

        fb = get_forward_backward_func()

        def train(ddps, opt, state, first, n):
            record_norms_around_step(opt, ddps, state)
            losses = []
            for step in range(first, first + n):
                for d in ddps:
                    d.zero_grad_buffer()
                opt.zero_grad()
                g = torch.Generator().manual_seed(1000 + step)
                micro = [torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g) for _ in range(MICRO)]
                data = [iter(micro) for _ in range(vpp)]  # each model chunk reads every micro-batch once

                def forward_step(data_iterator, model):
                    toks = next(data_iterator)
                    pos = torch.arange(SEQ).unsqueeze(0).expand(MBS, -1)
                    output = model(toks[:, :-1], pos, None, labels=toks[:, 1:])
                    return output, lambda o: (o.float().mean(), {"lm loss": o.float().mean().clone().detach()})

                reduced = fb(forward_step_func=forward_step, data_iterator=data if vpp > 1 else data[0],
                             model=ddps if vpp > 1 else ddps[0], num_microbatches=MICRO, seq_length=SEQ,
                             micro_batch_size=MBS, forward_only=False)
                opt.step()
                if reduced:
                    losses.append(float(sum(r["lm loss"] for r in reduced) / len(reduced)))
            return losses

        def model_keys(c):
            return f"model{c}" if vpp > 1 else "model"

        def weights(chunks):
            return {model_keys(c): {k: v.detach().clone() for k, v in m.state_dict_for_save_checkpoint().items()
                                    if isinstance(v, torch.Tensor)} for c, m in enumerate(chunks)}

        def moments(opt):
            return [{k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
                    for o in getattr(opt, "chained_optimizers", [opt]) for st in o.optimizer.state.values()]

        steps = 2
        chunks, ddps, opt = build()
        state = CheckFreeState()
        train(ddps, opt, state, 0, steps)
        saved, saved_moments = weights(chunks), moments(opt)
        all_saved = [None] * num_stages
        dist.all_gather_object(all_saved, saved)
        norms = [None] * num_stages
        dist.all_gather_object(norms, state.grad_norm)
        name = variant["name"]
        pristine = {f: os.path.join(out, f"{name}-pristine-{f}") for f in ("legacy", "torch_dist")}
        iter_name = f"iter_{steps:07d}"

        # Legacy: generate_state_dict + torch.save, and the distributed optimizer's distrib_optim.pt beside it.
        it = os.path.join(pristine["legacy"], iter_name)
        shard = os.path.join(it, f"mp_rank_00_{stage:03d}", "model_optim_rng.pt")
        os.makedirs(os.path.dirname(shard), exist_ok=True)
        legacy = {"args": args, "checkpoint_version": 3.0, "iteration": steps, "optimizer": opt.state_dict(),
                  "rng_state": rng_state_of(), "num_floating_point_operations_so_far": 0}
        legacy.update({model_keys(c): m.state_dict_for_save_checkpoint() for c, m in enumerate(chunks)})
        if distopt:
            opt.save_parameter_state(os.path.join(os.path.dirname(shard), "distrib_optim.pt"))
        torch.save(legacy, shard)
        dist.barrier()
        if rank == 0:
            with open(os.path.join(pristine["legacy"], "latest_checkpointed_iteration.txt"), "w") as f:
                f.write(str(steps))
        save_checkfree_state(it, ddps, state, steps, optimizer=opt)
        # torch_dist, with the distributed optimizer's default sharding in Megatron-LM (dp_reshardable).
        it = os.path.join(pristine["torch_dist"], iter_name)
        if rank == 0:
            os.makedirs(it, exist_ok=True)
        dist.barrier()
        meta = {"distrib_optim_sharding_type": "dp_reshardable"}
        sd = {model_keys(c): m.sharded_state_dict() for c, m in enumerate(chunks)}
        sd["optimizer"] = opt.sharded_state_dict(sd, metadata=meta)
        sd.update(args=argparse.Namespace(**{**vars(args), "ckpt_format": "torch_dist"}), checkpoint_version=3.0,
                  iteration=steps, num_floating_point_operations_so_far=0,
                  rng_state=ShardedObject("rng_state", rng_state_of(), (num_stages, 1), (stage, 0), replica_id=0))
        dist_checkpointing.save(sd, it, content_metadata=meta)
        if rank == 0:
            with open(os.path.join(pristine["torch_dist"], "latest_checkpointed_iteration.txt"), "w") as f:
                f.write(str(steps))
        save_checkfree_state(it, ddps, state, steps, optimizer=opt)
        del chunks, ddps, opt

        for fmt in ("legacy", "torch_dist"):
            for lost in [None] + list(variant.get("lose", [])):
                case = f"{name}-{fmt}-{'intact' if lost is None else f'lost{lost}'}"
                work = os.path.join(out, case)
                if rank == 0:
                    shutil.copytree(pristine[fmt], work)
                    if variant.get("claim"):  # settings the hook reads from the saved args only
                        claim_args(os.path.join(work, iter_name), fmt, variant["claim"])
                    if lost is not None:
                        damage(os.path.join(work, iter_name), fmt, lost, "delete")
                dist.barrier()
                result = {"name": case, "rank": rank, "stage": stage, "lost": lost, "norms": norms}
                try:
                    reports = repair_before_load([(work, None)], events_file=os.path.join(out, "events.jsonl"))
                except RecoveryError as err:
                    result["error"] = str(err)
                    reports = None
                if reports is not None:
                    result["reports"] = reports
                    chunks, ddps, opt = build()
                    it = os.path.join(work, iter_name)
                    # fp32 params: the distributed optimizer's main params are views of them, so its loader's
                    # in-place copies need no_grad (under Megatron-LM's usual bf16 they are separate copies).
                    with torch.no_grad():
                        if fmt == "legacy":
                            d = os.path.join(it, f"mp_rank_00_{stage:03d}")
                            loaded = torch.load(os.path.join(d, "model_optim_rng.pt"), weights_only=False)
                            for c, m in enumerate(chunks):
                                m.load_state_dict(loaded[model_keys(c)], strict=True)
                            opt.load_state_dict(loaded["optimizer"])
                            if distopt:
                                # megatron.core 0.16.1 with torch's Adam (no TE/apex, as on CPU) copies every state
                                # key from distrib_optim.pt, which has no 'step': set it aside meanwhile.
                                inner = [st for o in opt.chained_optimizers for st in o.optimizer.state.values()]
                                kept = [st.pop("step") for st in inner]
                                opt.load_parameter_state(os.path.join(d, "distrib_optim.pt"))
                                for st, step in zip(inner, kept):
                                    st["step"] = step
                        else:
                            if distopt:  # its sharded_state_dict needs allocated Adam states (Megatron-LM's loader
                                # has them from the step its setup runs); the load overwrites every value
                                for o in opt.chained_optimizers:
                                    o._init_optimizer_states_with_dummy_values()
                            sd = {model_keys(c): m.sharded_state_dict() for c, m in enumerate(chunks)}
                            sd["optimizer"] = opt.sharded_state_dict(sd, is_loading=True, metadata=meta)
                            loaded = dist_checkpointing.load(sd, it)
                            for c, m in enumerate(chunks):
                                m.load_state_dict(loaded[model_keys(c)], strict=True)
                            opt.load_state_dict(loaded["optimizer"])
                    # What the files gave the rebuilt stage, before the hook's reset after loading.
                    result["moments_nonzero"] = sum(int(v.abs().sum() > 0) for st in moments(opt) for v in st.values())
                    result["adam_steps"] = sorted({float(st["step"]) for o in getattr(opt, "chained_optimizers", [opt])
                                                   for st in o.optimizer.state.values()})
                    state_after_load(None, steps, reports, CheckFreeState(), 1.0, opt)
                    now = weights(chunks)
                    if stage != lost:
                        result["max_diff_weights"] = max(float((now[m][k] - saved[m][k]).abs().max())
                                                         for m in saved for k in saved[m])
                        result["keys_equal"] = {m: sorted(v) for m, v in now.items()} == \
                            {m: sorted(v) for m, v in saved.items()}
                        cur = moments(opt)
                        result["max_diff_moments"] = max(float((a[k] - b[k]).abs().max())
                                                         for a, b in zip(cur, saved_moments) for k in a) \
                            if len(cur) == len(saved_moments) else None
                    else:
                        result["max_diff_rebuilt"], result["plan"] = expected_diff(now, all_saved, norms, lost,
                                                                                   num_stages, vpp)
                    result["losses_after"] = train(ddps, opt, CheckFreeState(), steps, 1)
                    del chunks, ddps, opt
                with open(os.path.join(out, f"{case}-rank{rank}.json"), "w") as f:
                    json.dump(result, f, default=str)
                dist.barrier()
