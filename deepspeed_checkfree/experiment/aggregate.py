"""A sweep's results over seeds: mean and spread of the final validation loss, the perplexity and the time to the
target, the time ratios against checkpointing and redundant computation beside the paper's, the ablation's
perplexity ratios, ``evaluations.csv`` and plots with a band over seeds. Pure apart from the writing.

A strategy that never reaches the target in some seed is never dropped: its time is then a lower bound (its
whole modelled run), shown with ``>=`` and the count of seeds that reached it; a ratio with such a bound in it is a
bound too (``>=`` or ``<=``), and one with bounds on both sides is ``n/a``.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import ConfigError

# (numerator, denominator) pairs the issue and the paper compare: CheckFree(+) against each baseline kind.
RATIO_NUMERATORS = ("gradnorm_average", "checkfree_plus")


def stats(values: Sequence[float]) -> Dict[str, Any]:
    """Mean, sample standard deviation, min, max and count of ``values`` (std 0 for one value)."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "values": []}
    return {"n": len(vals), "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "values": vals}


def check_failure_plans(run: Any, results: Mapping[str, Any]) -> None:
    """Every failure-facing strategy of one (rate, seed) must have met exactly that seed's failure plan (up to
    where it stopped); raw results from another plan (an edited config, a mixed-up directory) are an error."""
    cfg = run.cfg
    plan = cfg.failure_plan()
    for spec in cfg.strategies:
        res = results.get(spec.name)
        if res is None or spec.kind == "no_failure":
            continue
        met = [(r.iteration, tuple(r.lost)) for r in res.records if r.lost]
        want = [(it, tuple(lost)) for it, lost in plan.schedule(range(len(res.records)))]
        if met != want:
            raise ConfigError(
                f"{spec.name} at {run.rate.label}, seed {run.seed} met failures {met[:4]}... but that seed's plan "
                f"has {want[:4]}...: the strategies of one seed disagree on the failure plan, so its raw results "
                f"come from different configs. Re-run that seed (delete runs/{run.key}/raw) instead of reporting.")


def _bounded(row: Mapping[str, Any]) -> Tuple[float, bool]:
    """Time to target in hours, and whether it is only a lower bound (never reached: the whole run)."""
    if row["time_to_target_h"] is not None:
        return row["time_to_target_h"], False
    return row["modelled_hours"], True


def ratio_stats(pairs: Sequence[Tuple[Mapping[str, Any], Mapping[str, Any]]]) -> Dict[str, Any]:
    """Per-seed time ratio numerator / denominator (below 1: the numerator is faster) over seeds.

    ``bound``: None (exact), ">=" (the numerator missed the target in some seed), "<=" (the denominator did), or
    "n/a" (both sides are bounds in some seed, or they point different ways).
    """
    values, bounds = [], set()
    for num, den in pairs:
        (tn, ln), (td, ld) = _bounded(num), _bounded(den)
        if ln and ld:
            bounds.add("n/a")
        elif ln:
            bounds.add(">=")
        elif ld:
            bounds.add("<=")
        values.append(tn / td)
    out = stats(values)
    out["bound"] = None if not bounds else (bounds.pop() if len(bounds) == 1 else "n/a")
    return out


def _ppl(loss: Optional[float]) -> Optional[float]:
    return None if loss is None else math.exp(loss)


def rate_summary(rate: Any, runs: Sequence[Tuple[Any, Mapping[str, Any]]], names: Sequence[str]) -> Dict[str, Any]:
    """Aggregate the per-run summaries of one rate (``runs``: (run, its summary or None) per seed)."""
    strategies: Dict[str, Any] = {}
    reference = runs[0][0].cfg.reference_strategy()
    for name in names:
        rows = [(run.seed, s["strategies"].get(name)) for run, s in runs if s is not None]
        present = [(seed, r) for seed, r in rows if r is not None]
        missing = [run.seed for run, s in runs if s is None or name not in s["strategies"]]
        label = present[0][1]["label"] if present else name
        times = [_bounded(r) for _, r in present]
        excess = []
        for run, s in runs:
            if s is None or name not in s["strategies"] or reference not in s["strategies"]:
                continue
            mine, ref = s["strategies"][name]["final_val_loss"], s["strategies"][reference]["final_val_loss"]
            if mine is not None and ref is not None:
                excess.append(100.0 * (math.exp(mine - ref) - 1.0))
        strategies[name] = {
            "label": label, "kind": present[0][1]["kind"] if present else None, "missing_seeds": missing,
            "failures": stats([r["failures"] for _, r in present]),
            "final_val_loss": stats([r["final_val_loss"] for _, r in present if r["final_val_loss"] is not None]),
            "perplexity": stats([_ppl(r["final_val_loss"]) for _, r in present if r["final_val_loss"] is not None]),
            "perplexity_excess_pct": stats(excess),
            "time_to_target_h": stats([t for t, _ in times]),
            "reached": sum(1 for _, lower in times if not lower), "seeds": len(present),
            "stopped": {seed: r["stopped"] for seed, r in present if r["stopped"]},
        }
    ratios = []
    by_kind = {k: [n for n in names if strategies[n]["kind"] == k] for k in ("checkpoint", "redundant")}
    for num in RATIO_NUMERATORS:
        if num not in names:
            continue
        for kind in ("checkpoint", "redundant"):
            for den in by_kind[kind]:
                pairs = [(s["strategies"][num], s["strategies"][den]) for _, s in runs
                         if s is not None and num in s["strategies"] and den in s["strategies"]]
                entry = {"numerator": num, "denominator": den, "ours": ratio_stats(pairs) if pairs else None,
                         "paper": None}
                hours = rate.paper.hours
                if num in hours and den in hours:
                    entry["paper"] = hours[num] / hours[den]
                ratios.append(entry)
    ppl_ratios = []
    base = "gradnorm_average"
    if base in names:
        ablations = [s.name for s in runs[0][0].cfg.strategies if s.kind == "checkfree" and s.mode == "checkfree"]
        for name in ablations:
            if name == base:
                continue
            per_seed = []
            for _, s in runs:
                if s is None or name not in s["strategies"] or base not in s["strategies"]:
                    continue
                a, b = s["strategies"][name]["final_val_loss"], s["strategies"][base]["final_val_loss"]
                if a is not None and b is not None:
                    per_seed.append(math.exp(a - b))
            ppl = rate.paper.perplexity
            ppl_ratios.append({"strategy": name, "ours": stats(per_seed),
                               "paper": ppl[name] / ppl[base] if name in ppl and base in ppl else None})
    targets = stats([s["target_loss"] for _, s in runs if s is not None])
    return {"key": rate.key, "label": rate.label, "probability": runs[0][0].cfg.failure_probability(),
            "seeds": [run.seed for run, _ in runs], "target_loss": targets,
            "target_rule": next((s["target_rule"] for _, s in runs if s is not None), None),
            "strategies": strategies, "time_ratios": ratios, "perplexity_ratios": ppl_ratios,
            "paper": rate.paper.model_dump(mode="json")}


def summarize(sweep: Any, per_run: Mapping[str, Tuple[Any, Any, Any, Any]]) -> Dict[str, Any]:
    """The whole sweep's summary (JSON-ready)."""
    names = [s.name for s in sweep.runs[0].cfg.strategies]
    rates = []
    for rate in sweep.section.rates:
        runs = [(run, summary) for run, _, _, summary in per_run.values() if run.rate.key == rate.key]
        rates.append(rate_summary(rate, runs, names))
    first = sweep.runs[0].cfg
    clocks = {run.rate.key: clock.as_dict() for run, _, clock, _ in per_run.values()}
    return {"name": sweep.name, "seeds": list(sweep.section.seeds), "seed_sets": list(sweep.section.seed_sets),
            "iterations": first.training.iterations, "strategies": names,
            "failure_stages": list(first.failure_stages()), "rates": rates, "clocks": clocks,
            "failure_events": {run.key: len(run.cfg.failure_plan().schedule(range(run.cfg.training.iterations)))
                               for run, _, _, _ in per_run.values()}}


# ---------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------

def _ms(s: Mapping[str, Any], digits: int = 3) -> str:
    if not s or not s["n"]:
        return "-"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _time_cell(row: Mapping[str, Any]) -> str:
    cell = _ms(row["time_to_target_h"], 2)
    if row["seeds"] and row["reached"] < row["seeds"]:
        return f">= {cell} (not reached in {row['seeds'] - row['reached']} of {row['seeds']} seeds)"
    return cell


def _ratio_cell(r: Optional[Mapping[str, Any]]) -> str:
    if r is None or not r["n"]:
        return "-"
    if r["bound"] == "n/a":
        return "n/a (neither reached)"
    spread = f" ({r['min']:.2f}-{r['max']:.2f})" if r["n"] > 1 else ""
    return f"{(r['bound'] + ' ') if r['bound'] else ''}{r['mean']:.2f}{spread}"


def clock_line(summary: Mapping[str, Any], rate: Mapping[str, Any]) -> str:
    """The clock of one rate in a sentence (what the hours are made of), for the strategies that ran."""
    from .clock import ClockModel

    c = summary.get("clocks", {}).get(rate["key"])
    if c is None:
        return ""
    clock = ClockModel(**c)
    kinds = {row["kind"] for row in rate["strategies"].values()}
    plus = any(n.startswith("checkfree_plus") for n in rate["strategies"])
    its, costs = [], []
    for label, kind, mode, present in (("CheckFree", "checkfree", "checkfree", "checkfree" in kinds),
                                       ("CheckFree+", "checkfree", "checkfree_plus", plus),
                                       ("checkpointing", "checkpoint", "checkfree", "checkpoint" in kinds),
                                       ("redundant computation", "redundant", "checkfree", "redundant" in kinds)):
        if present:
            its.append(f"{label} {clock.iteration_seconds(kind, mode):.2f} s")
    if "checkfree" in kinds:
        costs.append(f"CheckFree {clock.recovery_seconds('checkfree', 2):.1f} s")
    if "checkpoint" in kinds:
        costs.append(f"checkpointing {clock.recovery_seconds('checkpoint'):.1f} s plus the rolled-back iterations "
                     f"(a checkpoint write costs training {clock.checkpoint_seconds():.1f} s)")
    if "redundant" in kinds:
        costs.append(f"redundant computation {clock.recovery_seconds('redundant'):.1f} s")
    return (f"Clock: iterations {', '.join(its)}" + (f"; one failure costs {', '.join(costs)}" if costs else "")
            + ".")


def markdown(summary: Mapping[str, Any]) -> str:
    """``summary.md``: per rate the table over seeds, then the ratios beside the paper's."""
    seeds = summary["seeds"]
    md = [f"# {summary['name']}", "",
          f"{summary['iterations']} executed iterations per strategy; seeds {seeds} (each sets "
          f"{', '.join(summary['seed_sets'])}); failing stages {summary['failure_stages']}. Cells are mean ± "
          f"sample standard deviation over seeds; ratio cells give the mean and the min-max range over seeds.", ""]
    for rate in summary["rates"]:
        t = rate["target_loss"]
        md += [f"## {rate['label']} (p = {rate['probability']:.4g} per stage and iteration)", "",
               f"Target validation loss {_ms(t, 4)}: {rate['target_rule']}. {clock_line(summary, rate)}",
               "",
               "| strategy | failures | final val loss | perplexity | perplexity vs no failures | time to target (h) |",
               "|---|---:|---:|---:|---:|---:|"]
        for name, row in rate["strategies"].items():
            label = f"{row['label']} (`{name}`)"
            if row["missing_seeds"]:
                label += f" **no result for seeds {row['missing_seeds']}**"
            if row["stopped"]:
                label += f" (stopped in seeds {sorted(row['stopped'])})"
            excess = row["perplexity_excess_pct"]
            md.append(f"| {label} | {_ms(row['failures'], 1)} | {_ms(row['final_val_loss'])} | "
                      f"{_ms(row['perplexity'], 2)} | "
                      f"{'-' if not excess['n'] else _ms(excess, 1) + ' %'} | {_time_cell(row)} |")
        md.append("")
    ratio_rows = [(rate, r) for rate in summary["rates"] for r in rate["time_ratios"]]
    if ratio_rows:
        md += ["## Time to target, strategy / baseline, beside the paper's Table 2 (below 1: faster)", "",
               "| rate | ratio | ours | paper |", "|---|---|---:|---:|"]
        for rate, r in ratio_rows:
            paper = "-" if r["paper"] is None else f"{r['paper']:.2f}"
            md.append(f"| {rate['label']} | `{r['numerator']}` / `{r['denominator']}` | {_ratio_cell(r['ours'])} | "
                      f"{paper} |")
        md.append("")
    ppl_rows = [(rate, r) for rate in summary["rates"] for r in rate["perplexity_ratios"]]
    if ppl_rows:
        md += ["## Final perplexity, strategy / `gradnorm_average`, beside the paper's ablation", "",
               "| rate | strategy | ours | paper |", "|---|---|---:|---:|"]
        for rate, r in ppl_rows:
            paper = "-" if r["paper"] is None else f"{r['paper']:.2f}"
            ours = r["ours"]
            cell = "-" if not ours["n"] else f"{ours['mean']:.3f} ({ours['min']:.3f}-{ours['max']:.3f})"
            md.append(f"| {rate['label']} | `{r['strategy']}` | {cell} | {paper} |")
        md.append("")
    excess_rows = [(rate, n, rng) for rate in summary["rates"] for n, rng in rate["paper"]["perplexity_excess_pct"]
                   .items()]
    if excess_rows:
        md += ["## Perplexity above the failure-free run, beside the paper's Table 3", "",
               "| rate | strategy | ours | paper |", "|---|---|---:|---:|"]
        for rate, name, (lo, hi) in excess_rows:
            md.append(f"| {rate['label']} | `{name}` | {_ms(rate['strategies'][name]['perplexity_excess_pct'], 1)} %"
                      f" | {lo:g}-{hi:g} % |")
        md.append("")
    return "\n".join(md) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Files and plots
# ---------------------------------------------------------------------------------------------------------------

def write_evaluations(path: Path, per_run: Mapping[str, Tuple[Any, Any, Any, Any]]) -> None:
    """Every evaluation of every (rate, seed, strategy): the data behind the plots, small enough to commit."""
    from .report import wall_clock

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rate_pct_h", "seed", "strategy", "iteration", "step", "val_loss", "wall_clock_h", "failures"])
        for run, results, clock, _ in per_run.values():
            times = wall_clock(run.cfg, results, clock)
            for name, res in results.items():
                for r in res.records:
                    if r.val_loss is not None:
                        w.writerow([run.rate.key, run.seed, name, r.iteration + 1, r.step + 1, f"{r.val_loss:.5f}",
                                    f"{times[name][r.iteration] / 3600:.4f}", r.failures])


def band(curves: Sequence[Tuple[Sequence[float], Sequence[float]]], points: int = 200
         ) -> Tuple[List[float], List[float], List[float], List[float]]:
    """Mean, min and max over curves (x, y) on a common grid where all of them are defined."""
    lo_x = max(c[0][0] for c in curves)
    hi_x = min(c[0][-1] for c in curves)
    grid = [lo_x + (hi_x - lo_x) * i / (points - 1) for i in range(points)] if hi_x > lo_x else [lo_x]
    cols = [[_interp(xs, ys, x) for xs, ys in curves] for x in grid]
    return grid, [statistics.fmean(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[0] if x < xs[0] else ys[-1]


def plot(out: Path, summary: Mapping[str, Any], per_run: Mapping[str, Tuple[Any, Any, Any, Any]]) -> List[Path]:
    """Validation loss against modelled hours and against executed iterations, one panel per rate: the mean over
    seeds with a min-max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .report import style_for, wall_clock

    rates = summary["rates"]
    paths = []
    for by_time, fname in ((True, "loss_vs_hours.png"), (False, "loss_vs_iteration.png")):
        fig, axes = plt.subplots(1, len(rates), figsize=(6.5 * len(rates), 5), squeeze=False)
        for ax, rate in zip(axes[0], rates):
            runs = [(run, res, clock) for run, res, clock, _ in per_run.values() if run.rate.key == rate["key"]]
            specs = runs[0][0].cfg.strategies
            lows, tops = [], []
            for spec in specs:
                curves = []
                for run, res, clock in runs:
                    if spec.name not in res:
                        continue
                    ev = [(r.iteration, r.val_loss) for r in res[spec.name].records if r.val_loss is not None]
                    times = wall_clock(run.cfg, {spec.name: res[spec.name]}, clock)[spec.name]
                    xs = [times[i] / 3600 if by_time else i + 1 for i, _ in ev]
                    curves.append((xs, [v for _, v in ev]))
                if not curves:
                    continue
                grid, mean, lo, hi = band(curves)
                color, ls = style_for(spec)
                ax.plot(grid, mean, color=color, linestyle=ls, linewidth=1.4,
                        label=f"{spec.label} [{spec.name}]")
                ax.fill_between(grid, lo, hi, color=color, alpha=0.15, linewidth=0)
                lows.append(min(lo))
                tops.append(_interp(grid, mean, grid[0] + 0.15 * (grid[-1] - grid[0])))
            t = rate["target_loss"]["mean"]
            if t is not None:
                ax.axhline(t, color="gray", linewidth=0.8, linestyle=":")
            if lows:
                top = min(tops)
                ax.set_ylim(min(lows) - 0.05 * (top - min(lows)), top)
            ax.set_title(f"{rate['label']} (p = {rate['probability']:.4g}), {len(runs)} seeds", fontsize=10)
            ax.set_xlabel("modelled wall-clock (h)" if by_time else "executed iteration")
            ax.set_ylabel("validation loss (nats/token)")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="upper right")
        fig.suptitle(f"{summary['name']}: mean over seeds, band min-max; target (dotted) = mean target", fontsize=11)
        fig.tight_layout()
        paths.append(out / fname)
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def write(sweep: Any, out: Path, per_run: Mapping[str, Tuple[Any, Any, Any, Any]], plots: bool = True
          ) -> Dict[str, Any]:
    """``summary.json``, ``summary.md``, ``evaluations.csv`` and (optionally) the band plots; returns the summary."""
    summary = summarize(sweep, per_run)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    write_evaluations(out / "evaluations.csv", per_run)
    if plots:
        plot(out, summary, per_run)
    return summary
