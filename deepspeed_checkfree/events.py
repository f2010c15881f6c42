"""Detection and recovery events: one readable log line and one JSON-lines record each.

Records go to the ``deepspeed_checkfree.events`` logger (as JSON text) and, when configured, are appended to a
file, so that benchmarks and users parse them instead of scraping log text.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Optional

event_logger = logging.getLogger("deepspeed_checkfree.events")


def identity(stage: Optional[int] = None, rank: Optional[int] = None, step: Optional[int] = None) -> str:
    """The prefix of every log line: ``[checkfree stage=2 rank=5 step=1200]``."""
    parts = [f"{k}={v}" for k, v in (("stage", stage), ("rank", rank), ("step", step)) if v is not None]
    return "[checkfree" + "".join(" " + p for p in parts) + "]"


class EventLog:
    """Writes one JSON record per event to the events logger and, if ``path`` is set, appends it to that file.

    Args:
        path: JSON-lines file to append to (created with its directory), or None.
    """

    def __init__(self, path: Optional[str] = None) -> None:
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, event: str, **fields: Any) -> dict:
        """Record ``event`` with ``fields`` (JSON-serialisable) and a wall-clock timestamp; return the record."""
        record = {"event": event, "time": round(time.time(), 6), **fields}
        line = json.dumps(record, sort_keys=False, default=str)
        event_logger.info(line)
        if self.path:
            # One write() of one line in append mode: records from several ranks do not interleave mid-line.
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        return record


def read_events(path: str) -> list:
    """All records of a JSON-lines events file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ``checkfree events FILE``: summarise a JSON-lines events file (detections and recoveries) as a table.
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
