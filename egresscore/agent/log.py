"""Structured logs: one JSON object per line on standard error.

Each line has ``time`` (RFC 3339, UTC), ``level``, ``event`` (a fixed name an operator
can grep or alert on) and the event's fields. ``--log-format text`` prints the same
fields as ``key=value`` for a terminal.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, TextIO

__all__ = ["EventLog"]


class EventLog:
    def __init__(self, stream: TextIO | None = None, *, text: bool = False, **context: Any) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.text = text
        self.context = context

    def bind(self, **context: Any) -> EventLog:
        """A log that adds ``context`` to every event (for example the worker's queue)."""
        return EventLog(self.stream, text=self.text, **{**self.context, **context})

    def emit(self, level: str, event: str, **fields: Any) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        record = {"time": stamp, "level": level, "event": event, "pid": os.getpid(), **self.context, **fields}
        if self.text:
            line = " ".join(f"{key}={value}" for key, value in record.items())
        else:
            line = json.dumps(record, default=str, separators=(",", ":"))
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken log stream must not stop the datapath

    def info(self, event: str, **fields: Any) -> None:
        self.emit("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.emit("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.emit("error", event, **fields)
