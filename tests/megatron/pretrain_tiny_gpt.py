"""A small GPT pretraining script on Megatron-LM's own training loop, ``megatron.training.pretrain``, as the
megatron-core 0.19 wheel ships it: our model provider (a megatron.core ``GPTModel`` on the local layer spec), byte
tokens from the corpus shipped with this package, and Megatron's argument parsing, data loaders, optimizer,
scheduler and checkpointing. The CheckFree hook is installed the way a user's job gets it, by running the script
through ``python -m deepspeed_checkfree.megatron.run`` (or ``launch/megatron_pretrain.py``).

On a GPU machine (torchrun, NCCL, bf16 as you like):

    torchrun --nproc-per-node 4 -m deepspeed_checkfree.megatron.run tests/megatron/pretrain_tiny_gpt.py \
        --pipeline-model-parallel-size 4 --num-layers 8 --hidden-size 64 --num-attention-heads 4 \
        --seq-length 64 --max-position-embeddings 64 --micro-batch-size 2 --global-batch-size 8 \
        --lr 3e-3 --train-iters 20 --transformer-impl local --position-embedding-type rope \
        --tokenizer-type NullTokenizer --vocab-size 256 --eval-iters 0 --eval-interval 1000 \
        --save ckpt --load ckpt --save-interval 10

On CPU processes (gloo), prefix ``python tests/megatron/megatron_lm_cpu_shim.py runner`` instead of ``-m ...run``
and add the CPU flags of patches/README. tests/megatron/test_megatron_pretrain.py runs it that way.
"""
from __future__ import annotations

import lzma
from functools import partial
from pathlib import Path

import numpy as np
import torch

CORPUS = Path(__file__).resolve().parents[2] / "deepspeed_checkfree" / "models" / "sotu.txt.xz"
CORPUS_BYTES = 2 << 20  # the first 2 MiB of the 10.8 MB corpus: plenty for a short run, and quick to decompress


class CorpusSamples(torch.utils.data.Dataset):
    """``num_samples`` windows of ``seq_length + 1`` byte tokens, sample ``i`` starting at a fixed pseudo-random
    place (the same on every rank and every run, so a resumed job sees what an uninterrupted one would)."""

    def __init__(self, tokens: np.ndarray, seq_length: int, num_samples: int, seed: int) -> None:
        self.tokens, self.seq_length = tokens, seq_length
        rng = np.random.default_rng(seed)
        self.starts = rng.integers(0, len(tokens) - seq_length - 1, size=max(int(num_samples), 1))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict:
        window = torch.from_numpy(self.tokens[self.starts[i]:self.starts[i] + self.seq_length + 1].astype(np.int64))
        return {"tokens": window[:-1], "labels": window[1:]}


def datasets_provider(train_val_test_num_samples):
    """Train / validation / test datasets of the shipped corpus (megatron.training asks every rank for them)."""
    from megatron.training import get_args

    args = get_args()
    text = lzma.LZMADecompressor().decompress(CORPUS.read_bytes(), max_length=CORPUS_BYTES)
    tokens = np.frombuffer(text, dtype=np.uint8)
    if args.padded_vocab_size < 256:
        raise SystemExit(f"byte tokens need --vocab-size >= 256 (got a padded vocabulary of {args.padded_vocab_size})")
    return tuple(CorpusSamples(tokens, args.seq_length, n, seed=args.seed + k) if n else None
                 for k, n in enumerate(train_val_test_num_samples))


datasets_provider.is_distributed = True  # every rank builds its loaders (the first and last stages read them)


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """A megatron.core GPTModel on the local (non-Transformer-Engine) layer spec, from Megatron's parsed args."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    return GPTModel(config=config or core_transformer_config_from_args(args),
                    transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings, pre_process=pre_process,
                    post_process=post_process, parallel_output=True,
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                    position_embedding_type=args.position_embedding_type, pg_collection=pg_collection,
                    vp_stage=vp_stage)


def loss_func(output_tensor):
    """The mean next-token cross entropy of a micro-batch (the model returns it per token when given labels)."""
    loss = output_tensor.float().mean()
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator, model):
    """One micro-batch through this rank's stage: the first stage reads tokens, the last the labels."""
    from megatron.core import parallel_state

    tokens = labels = position_ids = None
    if parallel_state.is_pipeline_first_stage() or parallel_state.is_pipeline_last_stage():
        batch = next(data_iterator)
        device = next(model.parameters()).device
        tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
        position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(loss_func)


def main() -> None:
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(args_defaults={"tokenizer_type": "NullTokenizer"})
    # No model config in the container: pretrain() builds the model with model_provider.
    pretrain(pretrain_cfg_container_from_args(args), datasets_provider, ModelType.encoder_or_decoder, forward_step,
             model_provider=model_provider)


if __name__ == "__main__":
    main()
