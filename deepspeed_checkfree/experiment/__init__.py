"""``checkfree experiment CONFIG.yaml --out DIR``: the comparison of recovery strategies of arXiv 2506.15461
under one seeded failure plan (the paper's failure model), on one model and one data order.

Modules: :mod:`.config` (the ``experiment:`` file), :mod:`.simulated` (the pipeline in one process),
:mod:`.strategies` (what each strategy does on a failure), :mod:`.clock` (the wall-clock model), :mod:`.runner`
(running it all), :mod:`.report` (CSV, summary, plots), :mod:`.engine_worker`/:mod:`.engine_launch` (the same on
the real DeepSpeed engine).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_subcommand", "run"]


def add_subcommand(subparsers) -> None:
    """Register ``checkfree experiment``."""
    p = subparsers.add_parser(
        "experiment", help="compare recovery strategies under a seeded failure plan (CSV, summary, plots)",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  checkfree experiment configs/experiments/cpu_reproduction.yaml --out runs/repro --jobs 2")
    p.add_argument("config", help="experiment YAML file (top-level key 'experiment:'; see configs/experiments/)")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--backend", choices=["simulated", "deepspeed"], help="override the file's backend")
    p.add_argument("--jobs", type=int, default=1, help="strategies trained in parallel (simulated backend)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job (default 1)")
    p.add_argument("--iterations", type=int, help="override training.iterations (e.g. a quick look)")
    p.add_argument("--strategies", help="comma-separated subset of the file's strategy names")
    p.add_argument("--seeds", help="a sweep file's seeds instead of its own: 0,1,2 or 0-4")
    p.add_argument("--rates", help="a subset of a sweep file's failure rates, in %%/h: 5,16")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report-only", action="store_true", help="rewrite CSV, summary and plots of a finished run "
                   "in --out from its raw records and config.yaml (no training)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit code (2 for a bad config)."""
    import yaml
    from ..core.config import read_config_file
    from ..errors import CheckFreeError, ConfigError
    from . import aggregate
    from .config import load_experiment, parse_experiment, select_strategies
    from .sweep import is_sweep_file, parse_seeds, parse_sweep, run_sweep
    from .sweep import report_only as sweep_report_only
    from .report import markdown_table
    from .runner import report_only, run_experiment

    try:
        if args.report_only:
            if is_sweep_file(yaml.safe_load((Path(args.out) / "config.yaml").read_text())):
                print(aggregate.markdown(sweep_report_only(Path(args.out), plots=not args.no_plots)))
                return 0
            summary = report_only(Path(args.out), plots=not args.no_plots)
        else:
            data = read_config_file(Path(args.config), "experiment file")
            cfg = load_experiment(args.config)
            overrides = cfg.model_dump(mode="json")
            if args.backend:
                overrides["backend"] = args.backend
            if args.iterations:
                overrides["training"]["iterations"] = args.iterations
            cfg = parse_experiment(overrides, source=f"experiment file {args.config!r} with overrides")
            if args.strategies:
                cfg = select_strategies(cfg, [s.strip() for s in args.strategies.split(",") if s.strip()])
            if is_sweep_file(data) or args.seeds or args.rates:
                if not is_sweep_file(data):
                    raise ConfigError(f"--seeds/--rates need a 'sweep:' section in {args.config!r} (see "
                                      f"configs/experiments/paper_table2.yaml).")
                if cfg.backend != "simulated":
                    raise ConfigError("a sweep runs on the simulated backend; drop --backend deepspeed or run one "
                                      "(rate, seed) as a plain experiment file.")
                sweep = parse_sweep({**data, "experiment": cfg.model_dump(mode="json")},
                                    source=f"experiment file {args.config!r}",
                                    seeds=parse_seeds(args.seeds) if args.seeds else None,
                                    rates=[r.strip() for r in args.rates.split(",") if r.strip()]
                                    if args.rates else None)
                summary = run_sweep(sweep, Path(args.out), jobs_n=args.jobs, threads=args.threads,
                                    progress=not args.no_progress, plots=not args.no_plots)
                print(aggregate.markdown(summary))
                print(f"results in {args.out}: summary.md, summary.json, evaluations.csv, loss_vs_hours.png, "
                      f"runs/<rate>_<seed>/")
                return 0
            summary = run_experiment(cfg, Path(args.out), jobs=args.jobs, threads=args.threads,
                                     progress=not args.no_progress, plots=not args.no_plots)
    except CheckFreeError as err:
        print(f"checkfree experiment: {err}", file=sys.stderr)
        return 2
    print(markdown_table(summary))
    print(f"\ntarget loss {summary['target_loss']:.4f} ({summary['target_rule']}); results in {args.out}: "
          f"results.csv, summary.md, summary.json" + ("" if args.no_plots else ", comparison.png"))
    return 0
