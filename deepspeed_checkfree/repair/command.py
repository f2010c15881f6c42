"""The ``checkfree repair`` subcommand: its options, the run, and the printed report."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from ..errors import CheckFreeError
from .base import STRATEGIES
from .dispatch import FORMATS, RepairReport, repair_checkpoint

logger = logging.getLogger(__name__)


def add_subcommand(subparsers: Any) -> None:
    """Register ``checkfree repair`` (found by :mod:`deepspeed_checkfree.cli`)."""
    p = subparsers.add_parser(
        "repair", help="rebuild a pipeline stage lost from a checkpoint, from its neighbours",
        description="Rebuild the missing or corrupt pipeline stage of a DeepSpeed pipeline, Megatron legacy or "
                    "Megatron torch_dist checkpoint from its neighbouring stages (gradient-norm weighted average for "
                    "a middle stage, copy plus the replicated embedding/head for the first or last stage), and "
                    "write it in the framework's own format so the framework's own loader resumes.")
    p.add_argument("checkpoint", help="save directory (DeepSpeed save_dir or Megatron --save) or one iteration "
                                      "directory of it")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-o", "--output", help="write the repaired checkpoint to this new directory")
    where.add_argument("--in-place", action="store_true", help="rewrite the damaged stage inside CHECKPOINT")
    p.add_argument("--stage", type=int, action="append", default=None, metavar="N",
                   help="rebuild stage N even if it looks intact (e.g. silently corrupted); repeatable")
    p.add_argument("--strategy", choices=STRATEGIES, default="gradnorm_average",
                   help="how a middle stage is rebuilt (default: the paper's gradient-norm weighted average)")
    p.add_argument("--format", dest="fmt", choices=FORMATS, help="skip format detection")
    p.add_argument("--iteration", "--tag", dest="tag", metavar="N",
                   help="Megatron iteration (what --ckpt-step loads) or DeepSpeed tag to repair (default: the latest "
                        "one, as the tracker file names it)")
    p.add_argument("--events-file", help="append JSON-lines detection/recovery records to this file")
    p.add_argument("--dry-run", action="store_true", help="detect and plan only, write nothing")
    p.add_argument("--no-value-check", dest="check_values", action="store_false",
                   help="skip the scan of every stage tensor for NaN/inf (it reads the whole checkpoint once); "
                        "missing, truncated and unreadable files are still found")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _print_report(report: RepairReport) -> None:
    print(f"checkpoint {report.source} ({report.format}, iteration {report.iteration}, {report.num_stages} stages)")
    if not report.damaged:
        checked = " and every tensor is finite" if report.bytes_checked else ""
        print(f"no damaged stage found: every stage's files are present and readable{checked}. Nothing to do.")
        return
    for s, why in sorted(report.damaged.items()):
        print(f"  stage {s}: {why}")
    for r in report.rebuilds:
        norms = ", ".join(f"{s}: {'-' if n is None else f'{n:.4g}'}" for s, n in zip(r.sources, r.norms))
        weights = ", ".join(f"{s}: {w:.4f}" for s, w in zip(r.sources, r.weights))
        verb = "would rebuild" if report.dry_run else "rebuilt"
        print(f"{verb} stage {r.stage} by {r.strategy} from stage(s) {list(r.sources)}; weights {{{weights}}}; "
              f"grad norms {{{norms}}}")
        for ch in r.chunks:  # virtual pipeline stages: each model chunk has its own neighbours
            srcs = ", ".join(f"stage {s} chunk {c}" for s, c in ch["sources"])
            ws = ", ".join(f"{w:.4f}" for w in ch["weights"])
            print(f"  model chunk {ch['chunk']} (virtual stage {ch['virtual_stage']}) by {ch['strategy']} from "
                  f"{srcs}; weights [{ws}]")
        if r.note:
            print(f"  note: {r.note}")
    for w in report.warnings:
        print(f"warning: {w}")
    if report.output:
        mib = 2 ** 20
        print(f"wrote {report.output}: read {report.bytes_read / mib:.1f} MiB of a {report.checkpoint_bytes / mib:.1f} "
              f"MiB checkpoint, wrote {report.bytes_written / mib:.1f} MiB, copied {report.bytes_copied / mib:.1f} MiB "
              f"in {report.duration_s:.2f} s")


def run(args: argparse.Namespace) -> int:
    """Run ``checkfree repair``; exit status 2 when the checkpoint cannot be repaired (the reason on stderr)."""
    try:
        report = repair_checkpoint(args.checkpoint, output=args.output, in_place=args.in_place, stages=args.stage,
                                   strategy=args.strategy, fmt=args.fmt, tag=args.tag, events_file=args.events_file,
                                   dry_run=args.dry_run, check_values=args.check_values)
    except CheckFreeError as err:
        print(f"checkfree repair: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_report(report)
    return 0
