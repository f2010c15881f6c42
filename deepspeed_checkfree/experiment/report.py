"""Results of an experiment: the CSV, the summary (final validation loss, time to a target loss, ratios against
checkpointing and redundant computation) as JSON and Markdown, and the PNG plots."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from ..errors import ConfigError
from .clock import ClockModel, timeline
from .config import ExperimentConfig, StrategySpec
from .strategies import StrategyResult

SENSITIVITY_FRACTIONS = (0.4, 0.6, 0.8)
CSV_COLUMNS = ["strategy", "iteration", "step", "train_loss", "val_loss", "wall_clock_s", "failures", "lost"]


def wall_clock(cfg: ExperimentConfig, results: Mapping[str, StrategyResult], clock: ClockModel
               ) -> Dict[str, List[float]]:
    """Modelled seconds at the end of every executed iteration, per strategy."""
    specs = {s.name: s for s in cfg.strategies}
    out = {}
    for name, res in results.items():
        spec = specs[name]
        out[name] = timeline([vars(r) for r in res.records], spec.kind, spec.pipeline_mode, clock)
    return out


def _evals(res: StrategyResult) -> List[Tuple[int, float]]:
    return [(r.iteration, r.val_loss) for r in res.records if r.val_loss is not None]


def _ran(cfg: ExperimentConfig, results: Mapping[str, StrategyResult]) -> Iterator[Tuple[StrategySpec, StrategyResult]]:
    """The strategies that have results, in the config's order (a --report-only run may lack some)."""
    for spec in cfg.strategies:
        if spec.name in results:
            yield spec, results[spec.name]


def target_loss(cfg: ExperimentConfig, results: Mapping[str, StrategyResult],
                fraction: Optional[float] = None) -> Tuple[float, str]:
    """The validation loss strategies race to, and how it was chosen (``fraction`` overrides the config's rule:
    the no_failure loss after that share of the run)."""
    if cfg.report.target_loss is not None and fraction is None:
        return cfg.report.target_loss, "given (report.target_loss)"
    fraction = cfg.report.target_fraction if fraction is None else fraction
    base = cfg.reference_strategy()
    if base is None or base not in results:
        raise ConfigError(f"the target loss is derived from the failure-free run, and {base or 'no_failure'!r} "
                          f"has no results; set report.target_loss or run it.")
    evals = _evals(results[base])
    horizon = fraction * cfg.training.iterations
    at = [e for e in evals if e[0] + 1 <= horizon] or evals[:1]
    it, loss = at[-1]
    return loss, f"{base} validation loss after {it + 1} of {cfg.training.iterations} iterations " \
                 f"(report.target_fraction={fraction})"


def _first_reaching(res: StrategyResult, times: Sequence[float], target: float) -> Optional[Tuple[float, float]]:
    """(iteration, seconds) at which the validation loss first reaches ``target``, interpolated linearly between
    the last evaluation above it and the first at or below it (evaluations are ``eval_every`` apart)."""
    prev: Optional[Tuple[int, float]] = None
    for r in res.records:
        if r.val_loss is None:
            continue
        if r.val_loss <= target:
            if prev is None or prev[1] == r.val_loss:
                return r.iteration + 1.0, times[r.iteration]
            frac = (prev[1] - target) / (prev[1] - r.val_loss)
            it = prev[0] + 1 + frac * (r.iteration - prev[0])
            return it, times[prev[0]] + frac * (times[r.iteration] - times[prev[0]])
        prev = (r.iteration, r.val_loss)
    return None


def summarize(cfg: ExperimentConfig, results: Mapping[str, StrategyResult], clock: ClockModel,
              times: Mapping[str, List[float]]) -> Dict[str, Any]:
    """The summary: per strategy its failures, final validation loss, time to the target and the ratios.

    ``speedup_vs_checkpoint`` is (time of the fastest checkpointing strategy to the target) / (this strategy's
    time): above 1 means faster than checkpointing. When the baseline never reaches the target, the ratio is a
    lower bound (the baseline's whole run) and ``*_is_lower_bound`` says so.
    """
    target, how = target_loss(cfg, results)
    rows: Dict[str, Dict[str, Any]] = {}
    for spec, res in _ran(cfg, results):
        evals = _evals(res)
        reached = _first_reaching(res, times[spec.name], target)
        rows[spec.name] = {
            "label": spec.label, "kind": spec.kind,
            "failures": res.records[-1].failures if res.records else 0,
            "final_val_loss": evals[-1][1] if evals else None,
            "final_iteration": res.records[-1].iteration + 1 if res.records else 0,
            "final_step": res.records[-1].step + 1 if res.records else 0,
            "modelled_hours": times[spec.name][-1] / 3600 if times[spec.name] else 0.0,
            "target_iteration": round(reached[0], 1) if reached else None,
            "time_to_target_h": reached[1] / 3600 if reached else None,
            "stopped": res.stopped,
        }

    def baseline(kind: str) -> Optional[Tuple[str, Optional[float], float]]:
        names = [n for n, r in rows.items() if r["kind"] == kind]
        if not names:
            return None
        reached = [n for n in names if rows[n]["time_to_target_h"] is not None]
        if reached:
            best = min(reached, key=lambda n: rows[n]["time_to_target_h"])
            return best, rows[best]["time_to_target_h"], rows[best]["time_to_target_h"]
        best = max(names, key=lambda n: rows[n]["modelled_hours"])
        return best, None, rows[best]["modelled_hours"]

    baselines = {"checkpoint": baseline("checkpoint"), "redundant": baseline("redundant")}
    # One target can sit on a failure's spike; the same race to easier and harder targets shows how robust it is.
    other_targets = []
    if cfg.reference_strategy() in results:
        for fraction in SENSITIVITY_FRACTIONS:
            loss, _ = target_loss(cfg, results, fraction)
            hours = {}
            for name in rows:
                hit = _first_reaching(results[name], times[name], loss)
                hours[name] = hit[1] / 3600 if hit else None
            other_targets.append({"fraction": fraction, "target_loss": loss, "time_to_target_h": hours})
    for row in rows.values():
        for kind, base in baselines.items():
            key = f"speedup_vs_{kind}"
            row[key], row[f"{key}_is_lower_bound"] = None, False
            if base is None or row["time_to_target_h"] is None or row is rows[base[0]]:
                continue
            _, reached_h, bound_h = base
            row[key] = bound_h / row["time_to_target_h"]
            row[f"{key}_is_lower_bound"] = reached_h is None
    return {
        "name": cfg.name, "backend": cfg.backend, "iterations": cfg.training.iterations,
        "target_loss": target, "target_rule": how,
        "failure_probability": cfg.failure_probability(), "failure_stages": list(cfg.failure_stages()),
        "failure_plan": [[it, list(lost)] for it, lost in cfg.failure_plan().schedule(range(cfg.training.iterations))],
        "clock": clock.as_dict(),
        "baselines": {k: (v[0] if v else None) for k, v in baselines.items()},
        "strategies": rows,
        "other_targets": other_targets,
    }


def write_csv(path: Path, cfg: ExperimentConfig, results: Mapping[str, StrategyResult],
              times: Mapping[str, List[float]]) -> None:
    """One row per strategy and executed iteration (validation loss empty where not evaluated)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for spec, res in _ran(cfg, results):
            for r, t in zip(res.records, times[spec.name]):
                w.writerow([spec.name, r.iteration, r.step, f"{r.train_loss:.6f}",
                            "" if r.val_loss is None else f"{r.val_loss:.6f}", f"{t:.3f}", r.failures,
                            " ".join(map(str, r.lost))])


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(row: Mapping[str, Any], kind: str) -> str:
    value = row[f"speedup_vs_{kind}"]
    if value is None:
        return "-"
    return f"{'>=' if row[f'speedup_vs_{kind}_is_lower_bound'] else ''}{value:.2f}x"


def _time_unit(summary: Mapping[str, Any]) -> Tuple[str, float]:
    longest = max((r["modelled_hours"] for r in summary["strategies"].values()), default=0.0)
    return ("h", 1.0) if longest >= 0.5 else ("min", 60.0) if longest * 60 >= 0.5 else ("s", 3600.0)


def markdown_table(summary: Mapping[str, Any]) -> str:
    """The results table (what the README shows)."""
    unit, scale = _time_unit(summary)
    base = {k: f" (`{v}`)" if v else "" for k, v in summary["baselines"].items()}
    lines = [f"| strategy | failures | final val loss | iterations to target | time to target ({unit}) | "
             f"vs checkpointing{base['checkpoint']} | vs redundant{base['redundant']} |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in summary["strategies"].items():
        label = f"{r['label']} (`{name}`)" + (" (stopped)" if r["stopped"] else "")
        t = r["time_to_target_h"]
        lines.append(f"| {label} | {r['failures']} | {_fmt(r['final_val_loss'])} | "
                     f"{r['target_iteration'] or 'not reached'} | {_fmt(None if t is None else t * scale, 2)} | "
                     f"{_ratio(r, 'checkpoint')} | {_ratio(r, 'redundant')} |")
    return "\n".join(lines)


def write_summary(out: Path, summary: Mapping[str, Any]) -> None:
    """``summary.json`` (everything) and ``summary.md`` (the table and how to read it)."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    c = summary["clock"]
    save_s = ClockModel(**c).checkpoint_write_seconds()
    md = [f"# {summary['name']}", "",
          f"{summary['iterations']} executed iterations per strategy, backend `{summary['backend']}`. Failure "
          f"plan: each of stages {summary['failure_stages']} fails with p = {summary['failure_probability']:.5f} per "
          f"iteration ({len(summary['failure_plan'])} failure events, the same for every strategy).", "",
          f"Target validation loss **{summary['target_loss']:.4f}**: {summary['target_rule']}. Ratios are the "
          f"baseline's time to target over the strategy's (>1: faster than the baseline; `>=`: the baseline never "
          f"reached the target, so its whole run is used); the checkpointing baseline is the fastest checkpointing "
          f"strategy. Iterations to target are interpolated between evaluations.", "",
          markdown_table(summary), "",
          f"Wall-clock model: iteration {c['iteration_s']:.3f} s ({c['source']}), compute {c['compute_s']:.3f} s, "
          f"stage weights {c['stage_bytes'] / 2**20:.2f} MiB, checkpoint write "
          f"{save_s:.3f} s"
          f"{'' if c['checkpoint_blocking'] else ' (not blocking)'}, restart {c['restart_s']} s per failure.", ""]
    if summary.get("other_targets"):
        unit, scale = _time_unit(summary)
        md += ["Time to other targets (the no_failure loss after 40/60/80% of the run), in " + unit + ":", "",
               "| strategy | " + " | ".join(f"{t['target_loss']:.3f} ({t['fraction']:.0%})"
                                          for t in summary["other_targets"]) + " |",
               "|---|" + "---:|" * len(summary["other_targets"])]
        for name in summary["strategies"]:
            cells = [_fmt(None if t["time_to_target_h"][name] is None else t["time_to_target_h"][name] * scale, 2)
                     for t in summary["other_targets"]]
            md.append(f"| `{name}` | " + " | ".join(cells) + " |")
        md.append("")
    stopped = {n: r["stopped"] for n, r in summary["strategies"].items() if r["stopped"]}
    for name, why in stopped.items():
        md.append(f"- `{name}` stopped at {why}")
    (out / "summary.md").write_text("\n".join(md) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------

STYLE = {"no_failure": ("black", "-"), "checkfree": ("tab:blue", "-"), "checkfree_plus": ("tab:green", "-"),
         "uniform_average": ("tab:cyan", "--"), "copy": ("tab:orange", "--"), "random": ("tab:red", ":"),
         "checkpoint": ("tab:purple", "-."), "redundant": ("tab:brown", "-.")}


def style_for(spec: StrategySpec) -> Tuple[str, str]:
    """Colour and line style of a strategy in every plot."""
    if spec.kind == "no_failure" and spec.pipeline_mode == "checkfree_plus":
        return "darkgreen", ":"
    if spec.kind == "checkfree":
        if spec.mode == "checkfree_plus":
            return STYLE["checkfree_plus"]
        return STYLE["checkfree" if spec.strategy == "gradnorm_average" else spec.strategy]
    return STYLE[spec.kind]


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[0] if x < xs[0] else ys[-1]


def plot(out: Path, cfg: ExperimentConfig, results: Mapping[str, StrategyResult],
         times: Mapping[str, List[float]], summary: Mapping[str, Any]) -> List[Path]:
    """Validation loss against executed iterations and against modelled wall-clock hours, failures marked.

    Writes ``comparison.png`` (both panels), ``loss_vs_iteration.png`` and ``loss_vs_wallclock.png``.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = summary["target_loss"]
    unit, scale = _time_unit(summary)
    curves = []
    for spec, res in _ran(cfg, results):
        ev = _evals(res)
        if not ev:
            continue
        its = [i + 1 for i, _ in ev]
        hours = [times[spec.name][i] / 3600 * scale for i, _ in ev]
        fails = [r.iteration for r in res.records if r.lost]
        curves.append((spec, its, hours, [v for _, v in ev], fails))
    if not curves:
        return []
    lows = [min(c[3]) for c in curves]
    # Clip the first part of training (every curve starts near log(vocab)) so the differences stay visible.
    base = next((c for c in curves if c[0].name == cfg.reference_strategy()), curves[0])
    top = _interp(base[1], base[3], 0.15 * cfg.training.iterations)
    ylim = (min(lows) - 0.05 * (top - min(lows)), top)

    plan_iterations = [it + 1 for it, _ in summary["failure_plan"]]

    def panel(ax, by_time: bool) -> None:
        if not by_time:  # every strategy meets the failures at the same executed iterations
            for i, it in enumerate(plan_iterations):
                ax.axvline(it, color="gray", alpha=0.25, linewidth=0.8, label="failure" if i == 0 else None)
        for spec, its, hours, vals, fails in curves:
            color, ls = style_for(spec)
            xs = hours if by_time else its
            ax.plot(xs, vals, color=color, linestyle=ls, linewidth=1.4, label=f"{spec.label} [{spec.name}]")
            if fails:
                f_x = [times[spec.name][i] / 3600 * scale if by_time else i + 1 for i in fails]
                ax.plot(f_x, [_interp(xs, vals, x) for x in f_x], linestyle="none", marker="x", markersize=4,
                        color=color, alpha=0.8)
        ax.axhline(target, color="gray", linewidth=0.8, linestyle=":")
        ax.set_ylim(*ylim)
        ax.set_xlabel(f"modelled wall-clock ({unit})" if by_time else "executed iteration")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)

    title = (f"{cfg.name}: {summary['iterations']} iterations, {len(summary['failure_plan'])} failure events "
             f"(gray lines; x on each curve), target {target:.3f} (dotted)")
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    panel(axes[0], False)
    panel(axes[1], True)
    axes[1].legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    paths.append(out / "comparison.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    for by_time, name in ((False, "loss_vs_iteration.png"), (True, "loss_vs_wallclock.png")):
        fig, ax = plt.subplots(figsize=(8, 5.5))
        panel(ax, by_time)
        ax.legend(fontsize=8, loc="upper right")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def report(out: Path, cfg: ExperimentConfig, results: Mapping[str, StrategyResult], clock: ClockModel,
           plots: bool = True) -> Dict[str, Any]:
    """Write the CSV, the summary and (optionally) the plots into ``out``; return the summary."""
    times = wall_clock(cfg, results, clock)
    summary = summarize(cfg, results, clock, times)
    write_csv(out / "results.csv", cfg, results, times)
    write_summary(out, summary)
    if plots:
        plot(out, cfg, results, times, summary)
    return summary

