"""One gateway worker process: one NFQUEUE queue, one SNAT table, one port range.

The agent forks a worker per queue after compiling the policies, so the compiled
classifier is shared copy-on-write. A worker restores its table from the snapshot
the previous run left, binds its queue, reports ready, and answers packets until
SIGTERM; then it answers what is already queued, writes its snapshot, and unbinds.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from egresscore.agent.log import EventLog
from egresscore.core.classifier import Classifier
from egresscore.core.gateway import GatewayDatapath
from egresscore.core.kernel_conntrack import KernelConntrack
from egresscore.core.nfqueue import NfQueue
from egresscore.core.snat_table import SnatState, SnatTable
from egresscore.errors import EgressCoreError, SnapshotError

__all__ = ["WorkerSpec", "snapshot_path", "status_path", "worker_main"]


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    queue: int
    port_range: tuple[int, int]
    egress_ips: tuple[str, ...]
    egress_of_gateway: tuple[int | None, ...]
    state_dir: Path
    max_entries: int
    timeouts: dict[str, float]
    batch_size: int
    queue_length: int
    fail_open: bool
    gso: bool
    snapshot: bool
    status_interval: float
    mark: int = 0x00400000
    tcp_in_kernel: bool = False


def snapshot_path(state_dir: Path, queue: int) -> Path:
    return state_dir / f"snat-queue-{queue}.snapshot"


def status_path(state_dir: Path, queue: int) -> Path:
    return state_dir / f"status-queue-{queue}.json"


def write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _status(spec: WorkerSpec, table: SnatTable, datapath: GatewayDatapath, state: str) -> dict[str, Any]:
    return {
        "queue": spec.queue,
        "pid": os.getpid(),
        "state": state,
        "time": time.time(),
        "port_range": list(spec.port_range),
        "entries": len(table),
        "table": table.counters(),
        "datapath": datapath.counters(),
    }


# How often the table's TCP entries are checked against the kernel's conntrack even when
# no destroy event was lost (a backstop; a lost event triggers a check at once).
RESYNC_INTERVAL = 60.0
TCP = 6


def resync_with_kernel(table: SnatTable, kernel: KernelConntrack) -> int:
    """Free the entries of TCP flows whose kernel entries are gone; returns how many.

    The table is listed before the kernel is dumped, so a flow handed over in between
    is not in the list and cannot be freed by mistake."""
    held = [
        (str(e.pod_ip), e.pod_port, str(e.remote_ip), e.remote_port)
        for e in table.entries()
        if e.protocol == TCP and e.state == SnatState.ESTABLISHED
    ]
    kernel.clear_events_lost()
    live = kernel.live_flows()
    freed = 0
    for flow in held:
        if flow not in live:
            freed += table.release(TCP, *flow)
    return freed


def worker_main(spec: WorkerSpec, classifier: Classifier, ready: Connection, log: EventLog) -> None:
    """The body of a worker process (never returns normally: the caller exits)."""
    log = log.bind(queue=spec.queue)
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    # Ctrl-C reaches the whole process group; the agent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        table = SnatTable(
            spec.egress_ips, port_range=spec.port_range, max_entries=spec.max_entries, timeouts=spec.timeouts
        )
        restored = 0
        snapshot_file = snapshot_path(spec.state_dir, spec.queue)
        if spec.snapshot and snapshot_file.exists():
            try:
                restored = table.restore(snapshot_file.read_bytes(), time.monotonic())
            except (OSError, SnapshotError) as error:
                log.error("snapshot_unreadable", path=str(snapshot_file), error=str(error))
            # Restored once: a crash later must not bring back these entries a second time.
            snapshot_file.unlink(missing_ok=True)
        queue = NfQueue(
            spec.queue,
            batch_size=spec.batch_size,
            max_length=spec.queue_length,
            fail_open=spec.fail_open,
            gso=spec.gso,
        )
        # Subscribed to destroy events before the first entry is created, so that no
        # entry of ours ends unnoticed.
        kernel = KernelConntrack(mark=spec.mark) if spec.tcp_in_kernel else None
        datapath = GatewayDatapath(
            queue, table, classifier, spec.egress_of_gateway, kernel=kernel, pass_mark=spec.mark << 2
        )
    except (EgressCoreError, OSError, ValueError) as error:
        ready.send(("error", f"queue {spec.queue}: {error}"))
        ready.close()
        raise SystemExit(1) from None
    log.info(
        "worker_ready", restored=restored, port_range=list(spec.port_range), egress_ips=list(spec.egress_ips)
    )
    ready.send(("ready", restored))
    ready.close()
    next_status = 0.0
    next_resync = time.monotonic() + RESYNC_INTERVAL
    try:
        while not stopping:
            datapath.process(0.2)
            datapath.follow_kernel()
            now = time.monotonic()
            if kernel is not None and (kernel.events_lost or now >= next_resync):
                try:
                    freed = resync_with_kernel(table, kernel)
                except EgressCoreError as error:
                    log.error("resync_failed", error=str(error))
                else:
                    if freed:
                        log.warning("resync_freed", entries=freed)
                next_resync = now + RESYNC_INTERVAL
            table.expire(now)
            if now >= next_status:
                write_atomically(
                    status_path(spec.state_dir, spec.queue),
                    json.dumps(_status(spec, table, datapath, "running")).encode(),
                )
                next_status = now + spec.status_interval
    finally:
        # Every packet already handed to this socket gets its verdict before the queue
        # is unbound; what the kernel queues after that is dropped by the kernel (no
        # listener, no bypass), never sent on untranslated.
        drained = datapath.drain()
        saved = 0
        if spec.snapshot:
            data = table.snapshot(time.monotonic())
            write_atomically(snapshot_file, data)
            saved = len(table)
        queue.close()
        write_atomically(
            status_path(spec.state_dir, spec.queue),
            json.dumps(_status(spec, table, datapath, "stopped")).encode(),
        )
        log.info("worker_stopped", drained=drained, snapshot_entries=saved, counters=datapath.counters())
