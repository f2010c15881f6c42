"""One rank of the pretraining scenarios: Megatron-LM's own training loop (``megatron.training.pretrain`` of the
megatron-core 0.19 wheel) runs tests/megatron/pretrain_tiny_gpt.py through the CheckFree runner
(``deepspeed_checkfree.megatron.run``), several times in one process group: train and save, then for each case lose
one stage's files and resume with the hook. What each run saved, loaded and trained is written per rank for
tests/megatron/test_megatron_pretrain.py to check.

Argument: a JSON spec {"out": DIR, "num_layers": N, "configs": [{"format": "torch"|"torch_dist", "distopt": bool,
"lose": [stage or null (intact), ...]}]}. Run by tests/harness (env:// rendezvous, one process per stage).
"""
from __future__ import annotations

import json
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "tests", "megatron", "pretrain_tiny_gpt.py")
SAVED_AT, RESUME_TO = 3, 5
LR_BOOST = 1.1

# Tiny fp32 GPT on CPU processes over gloo; every flag after the model's is a CPU workaround (patches/README).
MODEL_ARGS = ["--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
              "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
              "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "1", "--lr-decay-iters", "20",
              "--clip-grad", "0.0", "--seed", "1234", "--position-embedding-type", "rope",
              "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--eval-iters", "0",
              "--eval-interval", "1000", "--log-interval", "1",
              "--distributed-backend", "gloo", "--transformer-impl", "local", "--no-gradient-accumulation-fusion",
              "--no-persist-layer-norm", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
              "--no-bias-dropout-fusion", "--no-rope-fusion", "--use-cpu-initialization"]


def damage(iter_dir: str, fmt: str, stage: int) -> None:
    """Lose stage ``stage``'s files (TP = DP = 1: global rank = stage) and its sidecar record."""
    if fmt == "torch":
        shutil.rmtree(os.path.join(iter_dir, f"mp_rank_00_{stage:03d}"))
    else:
        for name in os.listdir(iter_dir):
            if name.startswith(f"__{stage}_") and name.endswith(".distcp"):
                os.remove(os.path.join(iter_dir, name))
    sidecar = os.path.join(iter_dir, "checkfree", f"stage_{stage:03d}.json")
    if os.path.exists(sidecar):
        os.remove(sidecar)


class Recorder:
    """Wraps the hook's wrappers of ``megatron.training.training`` once more, to record what each run saved, loaded
    and trained on this rank."""

    def __init__(self, T, state) -> None:
        import torch

        from deepspeed_checkfree.megatron.checkpoint import unwrap

        self.record: dict = {}
        hooked_save, hooked_load, hooked_step = T.save_checkpoint, T.load_checkpoint, T.train_step

        def weights(model):
            out = {}
            for chunk in model:
                out.update({k: v.detach().clone() for k, v in unwrap(chunk).state_dict_for_save_checkpoint().items()
                            if isinstance(v, torch.Tensor)})
            return out

        def optimizer_state(optimizer):
            from deepspeed_checkfree.megatron.checkpoint import _torch_optimizers  # noqa: PLC2701 - test introspection
            states = [s for o in _torch_optimizers(optimizer) for s in o.state.values()]
            return {"moments_nonzero": sum(int(v.abs().sum() > 0) for s in states for k, v in s.items()
                                           if k.startswith("exp_avg")),
                    "moments": sum(1 for s in states for k in s if k.startswith("exp_avg")),
                    "steps": sorted({float(s["step"]) for s in states if "step" in s})}

        def save_checkpoint(iteration, model, optimizer, *args, **kwargs):
            result = hooked_save(iteration, model, optimizer, *args, **kwargs)
            self.record.update(saved=weights(model), saved_norm=state.grad_norm, saved_iteration=iteration)
            return result

        def load_checkpoint(model, optimizer, *args, **kwargs):
            result = hooked_load(model, optimizer, *args, **kwargs)
            self.record.update(loaded=weights(model), loaded_iteration=result[0] if isinstance(result, tuple)
                               else result, lr_scale=state.lr_scale, rebuilt_stages=list(state.rebuilt_stages),
                               optimizer_after_load=optimizer_state(optimizer))
            return result

        def train_step(*args, **kwargs):
            result = hooked_step(*args, **kwargs)
            losses = result[0] if isinstance(result, tuple) else {}
            if "lm loss" in losses:
                self.record.setdefault("losses", []).append(float(losses["lm loss"]))
            self.record["norm"] = state.grad_norm
            return result

        T.save_checkpoint, T.load_checkpoint, T.train_step = save_checkpoint, load_checkpoint, train_step


def main() -> None:
    spec = json.loads(sys.argv[1])
    out = spec["out"]
    sys.path.insert(0, REPO)
    import torch

    from tests.megatron import distopt_resume_repro, training_cpu

    torch.set_num_threads(1)
    training_cpu.apply()
    # The distributed optimizer cannot be resumed by megatron.core's own loader with torch's Adam (no apex/TE);
    # the fix proposed to Megatron (docs/megatron.md) is applied so the real loop resumes and the rebuild is checked.
    distopt_resume_repro.apply_proposed_fix()
    import megatron.training.training as T
    import torch.distributed as dist
    from megatron.training.training import destroy_global_state

    from deepspeed_checkfree.megatron import install
    from deepspeed_checkfree.megatron.run import main as run_script

    recorder = Recorder(T, install())
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    # Each run builds its own process groups and destroy_global_state forgets them without destroying them (a job
    # runs pretrain() once): destroy them here, or every run of this process adds ~60 threads.
    groups = []
    new_group = dist.new_group

    def recorded_new_group(*args, **kwargs):
        group = new_group(*args, **kwargs)
        groups.append(group)
        return group

    dist.new_group = recorded_new_group

    def run(name: str, argv: list) -> None:
        recorder.record = {}
        error = None
        try:
            run_script([SCRIPT, "--pipeline-model-parallel-size", str(world), "--num-layers",
                        str(spec["num_layers"]), *MODEL_ARGS, *argv])
        except SystemExit as exc:  # pretrain's early-exit paths
            error = f"SystemExit({exc.code})" if exc.code else None
        except Exception as exc:  # noqa: BLE001 - recorded for the test, which names the run
            error = f"{type(exc).__name__}: {exc}"
        finally:
            destroy_global_state()
            for group in {id(g): g for g in groups if g not in (None, dist.GroupMember.NON_GROUP_MEMBER)}.values():
                try:
                    dist.destroy_process_group(group)
                except ValueError:  # destroyed already (megatron.core hands out some groups twice)
                    pass
            groups.clear()
        torch.save({**recorder.record, "error": error, "stage": rank}, os.path.join(out, f"{name}-rank{rank}.pt"))
        if error:
            raise SystemExit(f"run {name} failed on rank {rank}: {error}")

    for cfg in spec["configs"]:
        fmt, distopt = cfg["format"], cfg["distopt"]
        name = f"{fmt}-{'distopt' if distopt else 'adam'}"
        opts = ["--ckpt-format", fmt] + (["--use-distributed-optimizer"] if distopt else [])
        pristine = os.path.join(out, f"{name}-pristine")
        run(f"{name}-save", [*opts, "--train-iters", str(SAVED_AT), "--save", pristine,
                             "--save-interval", str(SAVED_AT)])
        for lost in cfg["lose"]:
            case = f"{name}-{'intact' if lost is None else f'lost{lost}'}"
            work = os.path.join(out, case)
            if rank == 0:
                shutil.copytree(pristine, work)
                if lost is not None:
                    damage(os.path.join(work, f"iter_{SAVED_AT:07d}"), fmt, lost)
            dist.barrier()
            # --train-iters differs from the saved run (weight-decay schedule length): keep the new one.
            run(case, [*opts, "--train-iters", str(RESUME_TO), "--override-opt_param-scheduler", "--load", work,
                       "--checkfree-lr-boost",
                       str(LR_BOOST), "--checkfree-events-file", os.path.join(out, f"{case}.events.jsonl")])


if __name__ == "__main__":  # dist_checkpointing may start processes that re-import this file
    main()
