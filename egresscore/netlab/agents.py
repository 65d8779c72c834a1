"""``egresscore run`` inside a lab namespace: start, wait for its log events, stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from egresscore.netlab.namespaces import Lab

__all__ = ["AgentRun", "egresscore_command"]


def egresscore_command() -> list[str]:
    """The ``egresscore`` command of this interpreter's installation."""
    script = Path(sys.executable).parent / "egresscore"
    return (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "from egresscore.cli import main; main()"]
    )


class AgentRun:
    """One ``egresscore run --role ROLE`` process in a lab namespace, logging JSON to a
    file of the lab's directory; the constructor waits for its ``started`` events (one
    per role: two for ``both``)."""

    def __init__(
        self,
        lab: Lab,
        namespace: str,
        config: Path,
        role: str = "gateway",
        log_name: str = "agent.log",
        *,
        wait: bool = True,
    ) -> None:
        self.lab = lab
        self.namespace = namespace
        self.config = config
        self.role = role
        self.log_path = lab.workdir / log_name
        self.log_path.touch()
        self.offset = self.log_path.stat().st_size
        # A process group of its own, so that a test can kill the agent and its workers at once.
        self.process = lab.spawn(
            namespace,
            [*egresscore_command(), "run", "--role", role, "--config", str(config)],
            log=log_name,
            start_new_session=True,
        )
        if wait:
            self.wait_started()

    def wait_started(self, timeout: float = 30) -> None:
        for part in ("gateway", "node") if self.role == "both" else (self.role,):
            self.wait_for("started", timeout, role=part)

    def events(self) -> list[dict[str, Any]]:
        text = self.log_path.read_text()[self.offset :]
        result = []
        for line in text.splitlines():
            try:
                result.append(json.loads(line))
            except ValueError:
                continue
        return result

    def wait_for(self, event: str, timeout: float = 20, **fields: Any) -> dict[str, Any]:
        """The first log record of ``event`` (with ``fields``); AssertionError with the
        log when none comes within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.events():
                if record.get("event") == event and all(record.get(k) == v for k, v in fields.items()):
                    return record
            if self.process.poll() is not None and event not in ("stopped", "failed"):
                break
            time.sleep(0.05)
        raise AssertionError(
            f"no {event!r} event with {fields}; the agent's log:\n{self.log_path.read_text()[self.offset :]}"
        )

    def stop(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise

    def reload(self) -> None:
        """SIGHUP: read the policy files again now."""
        self.process.send_signal(signal.SIGHUP)

    def crash(self) -> None:
        """SIGKILL the agent and its workers: nothing gets cleaned up."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def status(self) -> list[dict[str, Any]]:
        state = self.config.parent / self.state_dir_name()
        return [json.loads(path.read_text()) for path in sorted(state.glob("status-*.json"))]

    def state_dir_name(self) -> str:
        for line in self.config.read_text().splitlines():
            if line.startswith("state_dir:"):
                return line.split(":", 1)[1].strip()
        return "state"
