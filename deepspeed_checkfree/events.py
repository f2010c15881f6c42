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
    """All records of a JSON-lines events file, in order (of a file being written, the complete lines)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]  # (the last piece: "" or a partial line)


# ``checkfree events FILE``: summarise a JSON-lines events file (detections and recoveries) as a table. Standard
# library only, like the rest of this module: the command loads neither torch nor DeepSpeed.
def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "events", help="summarise a CheckFree events file",
        description="Print the records of a CheckFree events file (JSON lines: every detection, rebuild, outage "
                    "and stop) as a table.",
        epilog="Columns: the step (an outage's replayed step), the event, the rank(s) and stage(s) it concerns, "
               "seconds (a rebuild's duration, or an outage's length from the trainer's death to the first step "
               "of the re-formed job) and the details.")
    p.add_argument("path", help="events.jsonl written by the engine (checkfree.events_file) or the supervisor "
                                "(--events-file)")
    p.add_argument("--json", action="store_true", help="print the records as a JSON list instead of a table")
    p.set_defaults(func=run)


SECONDS_FIELDS = ("outage_s", "duration_s", "silent_s")  # the first one a record has goes in the seconds column
SHOWN_FIELDS = {"event", "time", "step", "replayed_step", "rank", "lost_ranks", "stage", "lost_stages",
                *SECONDS_FIELDS}
OUTAGE_PHASES = (("detected", "detected_s"), ("re-joined", "rejoined_s"), ("rebuilt", "rebuilt_s"),
                 ("resumed", "resumed_s"))
DETAIL_WIDTH = 110


def _ids(value: Any) -> str:
    if value is None:
        return ""
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def describe(record: dict) -> str:
    """The details column of ``record``: what the columns before it do not say."""
    event = record.get("event")
    if event == "recovery" and "strategy" in record:
        text = f"{record['strategy']} from stage(s) {_ids(record.get('sources'))}"
        if record.get("weights"):
            text += " weights " + ",".join(f"{w:.3f}" for w in record["weights"])
        if record.get("lr_after"):
            text += " lr " + ",".join(f"{lr:.3g}" for lr in record["lr_after"])
        return text
    if event == "outage":
        phases = ", ".join(f"{name} {record[key]:.3f}" for name, key in OUTAGE_PHASES if record.get(key) is not None)
        return (f"generation {record.get('generation')}: {phases} s after the {record.get('start')}; "
                f"{record.get('lost_steps')} lost steps")
    rest = " ".join(f"{k}={v}" for k, v in record.items() if k not in SHOWN_FIELDS)
    return rest if len(rest) <= DETAIL_WIDTH else rest[:DETAIL_WIDTH - 3] + "..."


def table(records: list) -> str:
    """``records`` as the table ``checkfree events`` prints."""
    lines = [f"{'step':>6} {'event':<17} {'rank':>5} {'stage':>5} {'seconds':>8}  details"]
    for r in records:
        step = r.get("step", r.get("replayed_step"))
        seconds = next((f"{r[k]:.3f}" for k in SECONDS_FIELDS if isinstance(r.get(k), (int, float))), "")
        lines.append(f"{_ids(step):>6} {str(r.get('event')):<17} {_ids(r.get('rank', r.get('lost_ranks'))):>5} "
                     f"{_ids(r.get('stage', r.get('lost_stages'))):>5} {seconds:>8}  {describe(r)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        records = read_events(args.path)
    except OSError as err:
        print(f"checkfree events: cannot read {args.path!r}: {err.strerror or err}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as err:
        print(f"checkfree events: {args.path!r} is not JSON lines (line {err.lineno}): {err.msg}", file=sys.stderr)
        return 2
    print(json.dumps(records, indent=2) if args.json else table(records))
    return 0
