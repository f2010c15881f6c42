"""megatron.core's DistributedOptimizer cannot be resumed by Megatron-LM's loader when the optimizer is torch's Adam
(neither apex nor Transformer Engine installed: "Falling back to Torch optimizers"). One process, megatron.core only,
no CheckFree code: a tiny fp32 GPTModel trains one step, is saved the two ways Megatron-LM's save_checkpoint saves a
distributed optimizer, and a fresh model + optimizer load each the way its load_checkpoint does.

    torchrun --nproc-per-node 1 distopt_resume_repro.py               # a GPU machine without apex / TE
    python tests/megatron/distopt_resume_repro.py --cpu               # CPU/gloo, with this repository's test patches
    ... --with-fix                                                    # the same with the fix proposed below

Seen with megatron-core 0.19.2 (lines below; 0.16.1 fails the same way at lines 940 and 642), torch 2.13.0:
    legacy (torch): FAILED with RuntimeError: a view of a leaf Variable that requires grad is being used in an
        in-place operation. (megatron/core/optimizer/distrib_optimizer.py:1225 in _set_main_param_and_optimizer_states)
    torch_dist: FAILED with AssertionError (megatron/core/optimizer/distrib_optimizer.py:839 in state_dict)
With --with-fix both resume, with the saved weights.
"""
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist

META = {"distrib_optim_sharding_type": "dp_reshardable"}  # Megatron-LM's default for torch_dist


def apply_proposed_fix() -> None:
    """The two changes proposed for megatron/core/optimizer/distrib_optimizer.py, as monkeypatches.

    1. ``sharded_state_dict(is_loading=True)`` calls ``state_dict()`` first, which reads torch Adam's per-parameter
       ``step``; a freshly built optimizer has no state until its first step (``assert len(steps) == 1`` fails).
       Allocate the state first, as the ``fsdp_dtensor`` path of the same method already does
       (``_init_optimizer_states_with_dummy_values``); the load overwrites every value.
    2. ``load_parameter_state_from_dp_zero`` copies into the main parameters without ``@torch.no_grad()`` (its
       siblings have it; with fp32 parameters the main parameters are views of the model's leaf parameters), and
       ``_set_main_param_and_optimizer_states`` copies every tensor of the optimizer state, including torch Adam's
       ``step``, which distrib_optim.pt does not hold (``KeyError: 'step'``; the step comes from the param groups).
       Copy under ``no_grad`` and skip the state keys the file does not hold.
    """
    from megatron.core.optimizer import distrib_optimizer as D

    cls = D.DistributedOptimizer
    orig_sharded, orig_set = cls.sharded_state_dict, cls._set_main_param_and_optimizer_states

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, *args, **kwargs):
        if is_loading and not D.HAVE_APEX_OR_TE and len(self.optimizer.state) == 0:
            self._init_optimizer_states_with_dummy_values()
        return orig_sharded(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    def set_main_param_and_optimizer_states(self, model_param, tensors):
        # "skip the keys the file does not hold", from outside the loop: such a key keeps the value it has.
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        kept = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor) and k not in tensors}
        with torch.no_grad():
            return orig_set(self, model_param, {**tensors, **kept})

    cls.sharded_state_dict = sharded_state_dict
    cls._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states


def _megatron_frame(err: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "megatron/core" in f.filename]
    f = frames[-1] if frames else traceback.extract_tb(err.__traceback__)[-1]
    return f"{f.filename[f.filename.find('megatron/core'):]}:{f.lineno} in {f.name}"


def main() -> None:
    cpu = "--cpu" in sys.argv
    if cpu:  # megatron.core's CUDA-only calls, faked for a CPU process (test code of deepspeed_checkfree)
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        from tests.megatron import cpu_patches
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599"}.items():
        os.environ.setdefault(key, value)
    dist.init_process_group("gloo" if cpu else "nccl")
    if cpu:
        cpu_patches.apply()
    else:
        torch.cuda.set_device(0)
    if "--with-fix" in sys.argv:
        apply_proposed_fix()

    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)

    def build():
        cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
                                gradient_accumulation_fusion=False, bias_dropout_fusion=False,
                                persist_layer_norm=False, masked_softmax_fusion=False, apply_rope_fusion=False)
        model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=128,
                         max_sequence_length=16, position_embedding_type="rope")
        if not cpu:
            model.cuda()
        ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True),
                                     [ddp])
        return model, ddp, opt

    model, ddp, opt = build()
    device = next(model.parameters()).device
    tokens = torch.randint(0, 128, (2, 17), device=device)
    model(tokens[:, :-1], torch.arange(16, device=device).expand(2, -1), None, labels=tokens[:, 1:]).mean().backward()
    ddp.finish_grad_sync()
    opt.step()
    saved = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}

    ckpt = tempfile.mkdtemp()
    # --ckpt-format torch: model_optim_rng.pt holds optimizer.state_dict(), distrib_optim.pt the sharded state.
    torch.save({"optimizer": opt.state_dict()}, os.path.join(ckpt, "model_optim_rng.pt"))
    opt.save_parameter_state(os.path.join(ckpt, "distrib_optim.pt"))
    # --ckpt-format torch_dist: dist_checkpointing.save of the sharded state dict.
    os.makedirs(os.path.join(ckpt, "dist"))
    sd = {"model": model.sharded_state_dict()}
    sd["optimizer"] = opt.sharded_state_dict(sd, metadata=META)
    dist_checkpointing.save(sd, os.path.join(ckpt, "dist"), content_metadata=META)

    def load_legacy():  # megatron/training/checkpointing.py load_checkpoint with --ckpt-format torch
        fresh, _, fresh_opt = build()
        fresh_opt.load_state_dict(torch.load(os.path.join(ckpt, "model_optim_rng.pt"),
                                             weights_only=False)["optimizer"])
        fresh_opt.load_parameter_state(os.path.join(ckpt, "distrib_optim.pt"))
        return fresh

    def load_torch_dist():  # the same with --ckpt-format torch_dist (generate_state_dict, then load)
        fresh, _, fresh_opt = build()
        sd = {"model": fresh.sharded_state_dict()}
        sd["optimizer"] = fresh_opt.sharded_state_dict(sd, is_loading=True, metadata=META)
        loaded = dist_checkpointing.load(sd, os.path.join(ckpt, "dist"))
        fresh.load_state_dict(loaded["model"])
        fresh_opt.load_state_dict(loaded["optimizer"])
        return fresh

    for what, load in (("legacy (torch)", load_legacy), ("torch_dist", load_torch_dist)):
        try:
            fresh = load()
        except Exception as err:  # noqa: BLE001 - the outcome is the report
            print(f"{what}: FAILED with {type(err).__name__}: {err} (raised at {_megatron_frame(err)})", flush=True)
            continue
        same = all(torch.equal(v, fresh.state_dict()[k]) for k, v in saved.items())
        print(f"{what}: resumed, weights {'equal to' if same else 'DIFFERENT from'} the saved ones", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing.save starts a spawn-context process that re-imports this file
    main()
