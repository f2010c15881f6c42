"""Checks shared by the engine tests, on what the ranks of one pipeline (one record per stage, in stage order) saved.

Each computes the expected result independently of the library: the paper's blend, element-wise, per block.
"""
from __future__ import annotations

import math

import torch

EPS = 1e-4


def blocks(params: dict) -> list:
    """Layer prefixes of the transformer blocks in a stage's parameters, in layer order."""
    return sorted({int(n.split(".")[0]) for n in params if n.endswith(".qkv.weight")})


def expected_blend(target_params, sources, weights, dtype):
    """The paper's rule computed here, independently of the library: per block, element-wise."""
    expected = {}
    tgt_blocks = blocks(target_params)
    src_blocks = [blocks(s) for s in sources]
    for k, layer in enumerate(tgt_blocks):
        for name in target_params:
            if not name.startswith(f"{layer}."):
                continue
            suffix = name[len(str(layer)):]
            vals = [s[f"{b[k]}{suffix}"].float() for s, b in zip(sources, src_blocks)]
            if len(vals) == 2:
                blended = (weights[0] * vals[0] + weights[1] * vals[1]) / (weights[0] + weights[1])
            else:
                blended = vals[0] * weights[0] / weights[0]
            expected[name] = blended.to(dtype)
    return expected


def rebuild(recs, stage, index=0):
    return recs[stage]["rebuilds"][index]


def check_rebuild_exact(recs, target, strategy="gradnorm_average", norm="plain"):
    sources = {"copy": [target - 1]}.get(strategy, [target - 1, target + 1])
    before = [rebuild(recs, s)["before"] for s in sources]
    if strategy == "gradnorm_average":
        mags = [b["norm"] ** 2 if norm == "squared" else b["norm"] for b in before]
        weights = [m + EPS for m in mags]
    else:
        weights = [1.0] * len(sources)
    after = rebuild(recs, target)["after"]["params"]
    dtype = next(iter(after.values())).dtype
    expected = expected_blend(after, [b["params"] for b in before], weights, dtype)
    assert set(expected) == set(after), "every parameter of the rebuilt stage comes from the neighbours"
    for name, value in expected.items():
        assert torch.equal(after[name], value), f"{name} differs from the independently computed blend"
    return weights


def check_survivors_untouched(recs, target):
    """Every other stage's weights and optimizer state are bit-identical across the rebuild."""
    for stage in range(len(recs)):
        if stage == target:
            continue
        rb = rebuild(recs, stage)
        for name, p in rb["before"]["params"].items():
            assert torch.equal(p, rb["after"]["params"][name]), f"stage {stage} {name} changed"
        before_opt, after_opt = rb["before"]["opt_state"], rb["after"]["opt_state"]
        assert before_opt.keys() == after_opt.keys()
        for k in before_opt:
            for field, v in before_opt[k].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(after_opt[k][field])), \
                    f"stage {stage} optimizer state {k}.{field} changed"


def check_training_continues(recs, fail_step):
    losses = recs[0]["losses"]
    assert all(math.isfinite(l) for l in losses), losses
    after = losses[fail_step:]
    assert len(after) >= 4
    assert sum(after[-2:]) / 2 < sum(after[:2]) / 2, f"loss does not keep falling after the rebuild: {after}"
