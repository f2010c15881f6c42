"""Run Megatron-LM's own training loop (pretrain_gpt.py of tag core_v0.16.1) on CPU/gloo, with CheckFree.

Not a pytest test: Megatron-LM is not on PyPI and must not be vendored, so this runs only by hand, against a
checkout outside this repository (see patches/README for how it was used to check the patch and the runner):

    pip install --target /tmp/mlmdeps six regex          # megatron.training's extra imports
    for r in 0 1; do PYTHONPATH=/tmp/mlmdeps RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 \
        MASTER_PORT=29777 OMP_NUM_THREADS=1 timeout 300 python tests/megatron/megatron_lm_cpu_shim.py \
        runner /path/Megatron-LM/pretrain_gpt.py --pipeline-model-parallel-size 2 --num-layers 4 \
        --hidden-size 32 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 \
        --micro-batch-size 2 --global-batch-size 8 --lr 3e-3 --min-lr 3e-4 --clip-grad 0.0 --train-iters 4 \
        --distributed-backend gloo --transformer-impl local --no-gradient-accumulation-fusion \
        --no-persist-layer-norm --no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion \
        --no-rope-fusion --position-embedding-type rope --use-cpu-initialization --mock-data \
        --tokenizer-type NullTokenizer --vocab-size 128 --eval-iters 0 --eval-interval 1000 \
        --save CKPT --load CKPT --save-interval 4 --ckpt-format torch & done; wait

``runner`` goes through deepspeed_checkfree.megatron.run (unmodified script); ``direct`` runs a script patched with
patches/0001-pretrain_gpt-checkfree-hook.patch. The workarounds are those of shared/notes/megatron-on-cpu.md §4;
they fake CUDA, so they stay out of the library.
"""
import os
import runpy
import sys


def _main():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tests.megatron import training_cpu

    mode, script = sys.argv[1], os.path.abspath(sys.argv[2])
    sys.path.insert(0, os.path.dirname(script))
    training_cpu.apply()
    if mode == "runner":
        from deepspeed_checkfree.megatron.run import main
        main([script, *sys.argv[3:]])
    else:
        sys.argv = [script, *sys.argv[3:]]
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    _main()
