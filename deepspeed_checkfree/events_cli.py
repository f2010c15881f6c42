"""``checkfree events FILE``: summarise a JSON-lines events file (detections and recoveries) as a table."""
from __future__ import annotations

import argparse
import json
import sys

from .events import read_events


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("events", help="summarise a CheckFree events file", description=__doc__)
    p.add_argument("path", help="events.jsonl written by the engine (checkfree.events_file)")
    p.add_argument("--json", action="store_true", help="print the records as a JSON list instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        records = read_events(args.path)
    except OSError as err:
        print(f"checkfree events: cannot read {args.path!r}: {err.strerror or err}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as err:
        print(f"checkfree events: {args.path!r} is not JSON lines (line {err.lineno}): {err.msg}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    print(f"{'step':>6} {'event':<12} {'stage':>5} {'strategy':<17} {'sources':<10} {'weights':<18} {'seconds':>8}")
    for r in records:
        weights = ",".join(f"{w:.3f}" for w in r.get("weights", []))
        sources = ",".join(str(s) for s in r.get("sources", []))
        seconds = r.get("duration_s", "")
        print(f"{r.get('step', ''):>6} {r['event']:<12} {r.get('stage', ''):>5} {r.get('strategy', ''):<17} "
              f"{sources:<10} {weights:<18} {seconds!s:>8}")
    return 0
