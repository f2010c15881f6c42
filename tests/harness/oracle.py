"""The expected result of a rebuild, computed here from the neighbours' pre-failure weights, never by the library.

Everything works on *snapshots*, one per rank, taken just before and just after a rebuild; the engine scenarios
(tests/distributed) and the launch scripts' dumps (tests/e2e) both save them with these keys:

    params     {name: tensor} of the rank's stage        opt_state  the torch optimizer's ``state`` (per param id)
    norm       the library's stage gradient norm          lrs        the param groups' learning rates
    step       the engine's global step                   masters    {name: fp32 master} (bf16 / ZeRO only), or
                                                          fp32_masters [flat fp32 partitions] (bf16 / ZeRO only)

CPU runs are deterministic, so the checks are exact (``torch.equal``), not approximate.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

EPS = 1e-4  # added to each gradient norm before weighing (the paper's rule; the library's default eps)
TIED = "tied_modules."

Snapshot = Mapping[str, object]
Snapshots = Mapping[int, Snapshot]  # rank (or position in a column) -> snapshot; a list works too


# ----------------------------------------------------------------------------------------------------------
# Reading a stage's parameters
# ----------------------------------------------------------------------------------------------------------

def blocks(params: Mapping[str, torch.Tensor]) -> List[int]:
    """Layer indices of the transformer blocks in a stage's parameters, in layer order."""
    return sorted({int(n.split(".")[0]) for n in params if n.endswith(".qkv.weight") and not n.startswith(TIED)})


def stage_parts(params: Mapping[str, torch.Tensor], embed_key: str, head_key: str):
    """(embedding params, [block param dicts in layer order], head params) of one CheckFree+ stage, named as in
    the standalone modules (``gpt.Embedding``, ``gpt.Block``, ``gpt.Head``)."""
    emb = {n.split(".layer.", 1)[1]: p for n, p in params.items() if n.startswith(f"{TIED}{embed_key}.")}
    head = {n.split(".layer.", 1)[1]: p for n, p in params.items() if n.startswith(f"{TIED}{head_key}.")}
    idx = sorted({int(n.split(".")[0]) for n in params if not n.startswith(TIED)})
    block_ps = [{n.split(".", 1)[1]: p for n, p in params.items() if n.split(".")[0] == str(i)} for i in idx]
    return emb, block_ps, head


# ----------------------------------------------------------------------------------------------------------
# The rule
# ----------------------------------------------------------------------------------------------------------

def gradnorm_weights(norms: Sequence[float], squared: bool = False, distances: Sequence[int] = (1, 1),
                     eps: float = EPS) -> List[float]:
    """The paper's blend weights of two sources: gradient norm (or its square) plus eps, and, when both sources
    are not adjacent to the target, each weighed by the *other* source's distance (the nearer counts more)."""
    mags = [n ** 2 if squared else n for n in norms]
    return [(m + eps) * d for m, d in zip(mags, reversed(distances))]


def expected_rebuild(target_params: Mapping[str, torch.Tensor], sources: Sequence[Mapping[str, torch.Tensor]],
                     weights: Optional[Sequence[float]]) -> Dict[str, torch.Tensor]:
    """What every parameter of the rebuilt stage must be.

    Block k of the target is the weighted average of block k of each source, element-wise, in fp32 (bf16 weights
    blend in fp32, as the library documents), cast to the target's dtype. One source (``weights=None``) is a copy:
    its blocks, and its (de)embedding replicas, which have the same names on both stages (CheckFree+).
    """
    expected: Dict[str, torch.Tensor] = {}
    src_blocks = [blocks(s) for s in sources]
    for k, layer in enumerate(blocks(target_params)):
        for name, tgt in target_params.items():
            if not name.startswith(f"{layer}."):
                continue
            suffix = name[len(str(layer)):]
            vals = [s[f"{b[k]}{suffix}"].float() for s, b in zip(sources, src_blocks)]
            if weights is None:
                assert len(vals) == 1, "a copy has one source"
                want = vals[0]
            else:
                assert len(vals) == len(weights) == 2, "a blend has two sources"
                want = (weights[0] * vals[0] + weights[1] * vals[1]) / (weights[0] + weights[1])
            expected[name] = want.to(tgt.dtype)
    if weights is None:
        for name in target_params:
            if name.startswith(TIED):
                expected[name] = sources[0][name]
    return expected


# ----------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------

def check_rebuild(before: Snapshots, after: Snapshots, target: int, sources: Sequence[int],
                  weights: Optional[Sequence[float]] = None, lr_boost: Optional[float] = None,
                  expect_replica: bool = False, lrs_at: Optional[Snapshots] = None) -> None:
    """The rebuilt rank ``target`` holds exactly the blend (``weights``) or copy (``weights=None``) of the
    ``sources``' pre-failure weights, every one of its parameters accounted for, with a fresh optimizer.

    Args:
        lr_boost: if given, the rebuilt rank's LRs are this times the sources' (scheduled) LRs.
        expect_replica: a CheckFree+ edge stage: the copy must include an embedding or head replica.
        lrs_at: the snapshots whose LRs are compared (default ``after``). Across processes, a failure can come
            after some ranks applied the interrupted step and before others did: their schedules are a step apart
            until the replayed step, so there the snapshots after it are the ones to compare.
    """
    got = after[target]["params"]
    want = expected_rebuild(got, [before[s]["params"] for s in sources], weights)
    assert want, f"rank {target} has no block to rebuild"
    assert set(want) == set(got), \
        f"parameters of rank {target} not accounted for by the rebuild: {sorted(set(got) ^ set(want))}"
    how = "copy" if weights is None else "blend"
    for name, value in want.items():
        assert torch.equal(got[name], value), f"rank {target} {name} is not the {how} of ranks {list(sources)}"
    if expect_replica:
        assert any(n.startswith(TIED) for n in got), f"rank {target} has no (de)embedding replica"
    assert after[target]["opt_state"] == {}, "the rebuilt stage starts with a fresh optimizer"
    if lr_boost is not None:
        lrs_at = after if lrs_at is None else lrs_at
        mine = lrs_at[target]["lrs"]
        for s in sources:
            theirs = lrs_at[s]["lrs"]
            assert len(mine) == len(theirs) and all(
                math.isclose(a, lr_boost * b, rel_tol=1e-12) for a, b in zip(mine, theirs)), \
                f"rank {target} LRs {mine} are not {lr_boost} x rank {s}'s {theirs}"


def _masters(snap: Snapshot):
    return snap.get("masters") if snap.get("masters") is not None else snap.get("fp32_masters")


def check_same_state(a: Snapshot, b: Snapshot, what: str) -> None:
    """Two snapshots hold bit-identical weights, optimizer state and fp32 masters."""
    assert a["params"].keys() == b["params"].keys(), what
    for name, p in a["params"].items():
        assert torch.equal(p, b["params"][name]), f"{what}: {name} differs"
    assert a["opt_state"].keys() == b["opt_state"].keys(), f"{what}: optimizer state entries differ"
    for key, st in a["opt_state"].items():
        assert st.keys() == b["opt_state"][key].keys(), f"{what}: optimizer state {key} fields differ"
        for field, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["opt_state"][key][field])), \
                f"{what}: optimizer state {key}.{field} differs"
    ma, mb = _masters(a), _masters(b)
    assert (ma is None) == (mb is None), f"{what}: fp32 masters on one side only"
    if ma is not None:
        assert len(ma) == len(mb), f"{what}: fp32 masters differ in number"
        pairs = ma.items() if isinstance(ma, dict) else enumerate(ma)
        for key, m in pairs:
            assert torch.equal(m, mb[key]), f"{what}: fp32 master {key} differs"


def check_survivors_untouched(before: Snapshots, after: Snapshots, survivors: Sequence[int]) -> None:
    """Every surviving rank's weights, optimizer state and fp32 masters are bit-identical across the rebuild (under
    bf16/ZeRO the masters come through as they were, not re-derived from the low-precision weights)."""
    assert survivors, "no survivor to check"
    for rank in survivors:
        if before[rank]["step"] > 0:
            assert before[rank]["opt_state"], f"survivor rank {rank} has Adam moments to keep"
        check_same_state(before[rank], after[rank], f"survivor rank {rank}")


def check_masters_refreshed(snap: Snapshot) -> None:
    """The rebuilt stage's fp32 masters are its new weights (not the dead process's, nor fresh initialisation),
    so the next optimizer step cannot undo the rebuild."""
    params = snap["params"]
    if snap.get("masters") is not None:
        masters = snap["masters"]
        assert masters.keys() == params.keys()
        for name, p in params.items():
            assert torch.equal(masters[name], p.detach().float()), f"fp32 master of {name} is not its weight"
        return
    # Flat partitions (the launch scripts' dumps): they order parameters by optimizer group and may end in padding,
    # so compare as sorted values.
    flat = torch.cat([p.detach().float().flatten() for p in params.values()])
    masters = torch.cat([m.flatten() for m in snap["fp32_masters"]])
    assert masters.numel() >= flat.numel(), "fewer fp32 masters than weights"
    flat = torch.cat([flat, flat.new_zeros(masters.numel() - flat.numel())])
    assert torch.equal(torch.sort(masters).values, torch.sort(flat).values), "fp32 masters are not the weights"


def check_loss_falls(losses: Sequence[float], since: int = 0, window: int = 2) -> None:
    """Every loss is finite, and the mean of the last ``window`` losses is below that of ``window`` losses from
    step ``since`` on (training goes on learning after a rebuild at ``since``)."""
    assert all(math.isfinite(l) for l in losses), losses
    after = list(losses[since:])
    assert len(after) >= 2 * window, f"too few steps after step {since} to tell: {after}"
    assert sum(after[-window:]) / window < sum(after[:window]) / window, \
        f"loss does not keep falling after step {since}: {after}"


def stage_norms_from_squares(square_sums: Sequence[Sequence[float]]) -> List[float]:
    """Per step, the L2 norm of a stage's gradient from the squared sums its data-parallel ranks measured over
    their partitions (one list per rank; replicas that hold the whole gradient pass a single list)."""
    return [math.sqrt(sum(step)) for step in zip(*square_sums)]


def split_columns(records: Sequence[Mapping], stages: int, replicas: int) -> List[List[Mapping]]:
    """Per data-parallel replica, its ranks' records in stage order (each record carries "stage" and "dp_id")."""
    cols: Dict[int, Dict[int, Mapping]] = {}
    for rec in records:
        cols.setdefault(rec["dp_id"], {})[rec["stage"]] = rec
    assert sorted(cols) == list(range(replicas)) and all(sorted(c) == list(range(stages)) for c in cols.values())
    return [[cols[d][s] for s in range(stages)] for d in range(replicas)]


def rebuild_snapshots(records: Sequence[Mapping], index: int = 0) -> Tuple[List[Snapshot], List[Snapshot]]:
    """The (before, after) snapshots of every rank in ``records`` around its ``index``-th rebuild."""
    return ([r["rebuilds"][index]["before"] for r in records], [r["rebuilds"][index]["after"] for r in records])


# ----------------------------------------------------------------------------------------------------------
# On the engine scenarios' records (tests/harness/scenario_worker.py): one record per rank, in stage order
# ----------------------------------------------------------------------------------------------------------

def check_recorded_rebuild(records: Sequence[Mapping], target: int, strategy: str = "gradnorm_average",
                           squared: bool = False, index: int = 0, lr_boost: Optional[float] = 1.1,
                           expect_replica: bool = False) -> Optional[List[float]]:
    """The ``index``-th rebuild of stage ``target`` in a pipeline's records (one per stage, in stage order) is
    exactly the rule applied to its neighbours' pre-failure weights, and every other stage is bit-identical across
    it. Returns the blend weights (None for a copy).

    The weights come from the sources' last per-step gradient norms, which :func:`check_stage_norms_measured`
    checks against the norms the ranks measured themselves; a failure before any step falls back to uniform.
    """
    before, after = rebuild_snapshots(records, index)
    step = records[target]["rebuilds"][index]["step"]
    if strategy == "copy":  # from the one neighbour (stage 1 for the first stage under CheckFree+)
        sources = [target + 1] if target == 0 else [target - 1]
    else:
        sources = [target - 1, target + 1]
    if strategy == "gradnorm_average" and step > 0:
        norms = [records[s]["norms"][step - 1] for s in sources]
        assert [before[s]["norm"] for s in sources] == norms, "the rebuild uses the sources' last step's norms"
        weights: Optional[List[float]] = gradnorm_weights(norms, squared=squared)
    elif strategy in ("gradnorm_average", "uniform_average"):
        weights = [1.0, 1.0]
    else:
        assert strategy == "copy", strategy
        weights = None
    check_rebuild(before, after, target, sources, weights, lr_boost=lr_boost, expect_replica=expect_replica)
    check_survivors_untouched(before, after, [s for s in range(len(records)) if s != target])
    return weights


def check_stage_norms_measured(records: Sequence[Mapping], stages: int, replicas: int = 1,
                               partitioned: bool = False, rel: float = 1e-5) -> None:
    """At every step, every rank's ``stage_grad_norm`` is the L2 norm of its stage's gradient as the rank measured
    it (``grad_square_sums``). With ``partitioned`` (ZeRO-1 and data parallelism) each rank measured only its
    partition, and the stage's norm combines the partitions of all its data-parallel replicas."""
    for stage in range(stages):
        holders = [col[stage] for col in split_columns(records, stages, replicas)]
        for h in holders:
            assert len(h["norms"]) == len(h["grad_square_sums"]) > 0
            assert all(n is not None and math.isfinite(n) and n > 0 for n in h["norms"]), h["norms"]
            parts = [x["grad_square_sums"] for x in holders] if partitioned else [h["grad_square_sums"]]
            want = stage_norms_from_squares(parts)
            for step, (got, w) in enumerate(zip(h["norms"], want)):
                assert math.isclose(got, w, rel_tol=rel), \
                    f"stage {stage} step {step}: stage_grad_norm {got} but the gradient's norm is {w}"
