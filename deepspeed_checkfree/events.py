"""Detection and recovery events: one readable log line and one JSON-lines record each.

Records go to the ``deepspeed_checkfree.events`` logger (as JSON text) and, when configured, are appended to a
file, so that benchmarks and users parse them instead of scraping log text.
"""
from __future__ import annotations

import json
import logging
import os
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
