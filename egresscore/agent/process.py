"""The agent's side of its worker processes: fork, wait until ready, reload, stop."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from egresscore.agent.log import EventLog
from egresscore.core.classifier import Classifier
from egresscore.errors import EgressCoreError

__all__ = ["WorkerHandle", "restart_dead"]

_CONTEXT = multiprocessing.get_context("fork")
# Sockets a worker must not inherit (the agent's per-namespace locks: a worker that kept
# one alive would refuse the next agent after the first one was killed).
CLOSE_IN_WORKERS: list[socket.socket] = []
PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h


def _worker_entry(
    target: Callable[[Any, Classifier, Connection, EventLog], None],
    parent: int,
    spec: Any,
    classifier: Classifier,
    control: Connection,
    log: EventLog,
) -> None:
    for inherited in CLOSE_IN_WORKERS:
        inherited.close()
    # SIGTERM when the agent dies, however it dies: the worker then drains and exits like
    # on a stop (a worker without its agent would go on with stale policies forever).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        raise SystemExit(1)  # the agent died before the request took effect
    target(spec, classifier, control, log)


READY_TIMEOUT = 30.0
RELOAD_TIMEOUT = 60.0


class WorkerHandle:
    """One worker process and its control pipe. ``start()`` forks and waits for the
    worker's ``ready``; ``reload()`` hands it a new policy generation and waits for its
    answer; ``stop()`` sends SIGTERM and waits (SIGKILL after ``timeout``)."""

    def __init__(
        self,
        name: str,
        target: Callable[[Any, Classifier, Connection, EventLog], None],
        spec: Any,
        log: EventLog,
    ) -> None:
        self.name = name
        self.target = target
        self.spec = spec
        self.log = log
        self.process: BaseProcess | None = None
        self.connection: Connection | None = None
        self.restored = 0
        # Restarts after a death back off (0.5 s, doubling, at most 30 s) so that a worker
        # that cannot start does not spin.
        self.failures = 0
        self.next_attempt = 0.0

    def start(self, classifier: Classifier) -> None:
        parent, child = _CONTEXT.Pipe(duplex=True)
        process = _CONTEXT.Process(
            target=_worker_entry,
            args=(self.target, os.getpid(), self.spec, classifier, child, self.log),
            name=self.name,
            daemon=False,
        )
        process.start()
        child.close()
        self.process, self.connection = process, parent
        kind, detail = self._receive(READY_TIMEOUT)
        if kind != "ready":
            self.stop(5)
            message = detail if kind == "error" else f"{self.name} exited before it was ready"
            raise EgressCoreError(str(message))
        self.restored = int(detail)

    def _receive(self, timeout: float) -> tuple[str, Any]:
        assert self.connection is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.connection.poll(min(0.2, max(0.0, deadline - time.monotonic()))):
                    message = self.connection.recv()
                    return str(message[0]), message[1] if len(message) == 2 else tuple(message[1:])
            except (EOFError, OSError):
                break
            if self.process is not None and not self.process.is_alive():
                break
        return ("gone", None)

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def exitcode(self) -> int | None:
        return None if self.process is None else self.process.exitcode

    def reload(
        self, generation: int, texts: Sequence[tuple[str, str]], parameters: dict[str, Any]
    ) -> str | None:
        """Send one policy generation; returns None once the worker applied it, else why not."""
        if self.connection is None or not self.alive():
            return f"{self.name} is not running"
        try:
            self.connection.send(("policy", generation, list(texts), parameters))
        except (OSError, ValueError) as error:
            return f"{self.name}: {error}"
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while time.monotonic() < deadline:
            kind, detail = self._receive(deadline - time.monotonic())
            if kind == "applied" and detail == generation:
                return None
            if kind == "failed":
                return str(detail[1] if isinstance(detail, tuple) else detail)
            if kind == "gone":
                return f"{self.name} exited during the reload"
        return f"{self.name} did not apply generation {generation} within {RELOAD_TIMEOUT:g} s"

    def signal_stop(self) -> None:
        if self.process is not None and self.process.is_alive() and self.process.pid is not None:
            with contextlib.suppress(ProcessLookupError):  # it died meanwhile
                os.kill(self.process.pid, signal.SIGTERM)

    def join(self, timeout: float = 15) -> None:
        if self.process is None:
            return
        self.process.join(timeout)
        if self.process.is_alive():
            self.log.error("worker_kill", worker=self.name, detail=f"did not stop within {timeout:g} s")
            self.process.kill()
            self.process.join(5)
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def stop(self, timeout: float = 15) -> None:
        self.signal_stop()
        self.join(timeout)


def restart_dead(workers: dict[int, WorkerHandle], classifier: Classifier, log: EventLog) -> None:
    """Start again every worker that died (its queue drops packets meanwhile: no
    listener, no bypass), with ``classifier``; failed starts back off."""
    now = time.monotonic()
    for queue, handle in workers.items():
        if handle.alive() or now < handle.next_attempt:
            continue
        if handle.process is not None:
            log.error("worker_died", queue=queue, exitcode=handle.exitcode)
            handle.join(1)
            handle.process = None
        try:
            handle.start(classifier)
        except EgressCoreError as error:
            handle.failures += 1
            handle.next_attempt = now + min(30.0, 0.5 * 2 ** (handle.failures - 1))
            handle.process = None
            log.error(
                "worker_restart_failed", queue=queue, error=str(error), retry_in=handle.next_attempt - now
            )
        else:
            handle.failures = 0
