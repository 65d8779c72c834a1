"""Worker processes: one NFQUEUE queue each, forked by the agent after it compiled the
policies (the compiled classifier is shared copy-on-write).

A gateway worker has one SNAT table and one port range: it restores its table from the
snapshot the previous run left, binds its queue, reports ready, and answers packets
until SIGTERM; then it answers what is already queued, writes its snapshot, and
unbinds. A node worker decides its pods' flows (egresscore.core.node).

Each worker keeps a control pipe to the agent. A policy reload arrives on it as
``("policy", generation, texts, parameters)``: the worker compiles the same texts the
agent compiled (the compiler is deterministic, so gateway indices agree), swaps the
result in between two batches, and answers ``("applied", generation)``, or
``("failed", generation, message)`` keeping what it had.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from egresscore.agent.log import EventLog
from egresscore.core.classifier import Classifier
from egresscore.core.gateway import GatewayDatapath
from egresscore.core.kernel_conntrack import KernelConntrack
from egresscore.core.nfqueue import NfQueue
from egresscore.core.node import NodeDatapath, NodeDecisions
from egresscore.core.snat_table import SnatState, SnatTable
from egresscore.errors import EgressCoreError, SnapshotError

__all__ = [
    "GatewayWorkerSpec",
    "NodeWorkerSpec",
    "WorkerSpec",
    "gateway_worker_main",
    "node_worker_main",
    "snapshot_path",
    "status_path",
    "worker_main",
]

# Seconds of packet handling between two looks at the control pipe and the clock: the
# longest a reload waits for a worker, besides its compile.
SLICE = 0.05
# The node's queue copies this much of each packet: its addresses are all it reads.
NODE_COPY_RANGE = 128


@dataclass(frozen=True, slots=True)
class GatewayWorkerSpec:
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
    node: str = ""
    mark: int = 0x00400000
    tcp_in_kernel: bool = False
    # The tunnel's interface index: what arrives on it must be this gateway's to translate.
    tunnel_ifindex: int | None = None
    # Role both: the node role's mark bits, its pass value and its redirect flag.
    node_marks: tuple[int, int, int] = (0, 0, 0)


# The name the gateway role used before the node role came.
WorkerSpec = GatewayWorkerSpec


@dataclass(frozen=True, slots=True)
class NodeWorkerSpec:
    queue: int
    node: str
    state_dir: Path
    batch_size: int
    queue_length: int
    fail_open: bool
    status_interval: float
    mark_mask: int
    pass_value: int
    local_value: int | None
    drop_unknown: bool
    gateway_marks: tuple[int | None, ...] = field(default_factory=tuple)


def snapshot_path(state_dir: Path, queue: int) -> Path:
    return state_dir / f"snat-queue-{queue}.snapshot"


def status_path(state_dir: Path, queue: int, role: str = "gateway") -> Path:
    return state_dir / (
        f"status-queue-{queue}.json" if role == "gateway" else f"status-node-queue-{queue}.json"
    )


def write_atomically(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file whole.
    ``durable`` also waits for the disk (snapshots, records of what egresscore added);
    a status file, rewritten every interval, does not need to survive a power cut."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        if durable:
            os.fsync(handle.fileno())
    os.replace(temporary, path)


def compile_texts(texts: Sequence[tuple[str, str]], node: str) -> Classifier:
    """The classifier the agent compiled from the same texts, for the same node."""
    from egresscore.policy.compiler import Compiler
    from egresscore.policy.loader import load_texts

    return Compiler(load_texts(texts), node).classifier


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


class _Control:
    """The worker's end of its control pipe."""

    def __init__(self, connection: Connection, log: EventLog) -> None:
        self.connection = connection
        self.log = log
        # The agent's end closed: it is gone, and this worker stops.
        self.gone = False

    def send(self, *message: Any) -> None:
        # The agent may be gone: SIGTERM or the parent's death stops this worker then.
        with contextlib.suppress(OSError, ValueError):
            self.connection.send(message)

    def poll(self, handler: Callable[[int, list[tuple[str, str]], dict[str, Any]], None]) -> None:
        try:
            if not self.connection.poll(0):
                return
            message = self.connection.recv()
        except (EOFError, OSError):
            self.gone = True
            return
        if not message or message[0] != "policy":
            return
        _kind, generation, texts, parameters = message
        try:
            handler(generation, texts, parameters)
        except Exception as error:
            self.log.error("worker_reload_failed", generation=generation, error=str(error))
            self.send("failed", generation, str(error))
        else:
            self.send("applied", generation)


def _stop_on_sigterm() -> Callable[[], bool]:
    stopping = [False]

    def request_stop(signum: int, frame: object) -> None:
        stopping[0] = True

    signal.signal(signal.SIGTERM, request_stop)
    # Ctrl-C reaches the whole process group; the agent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGHUP asks the agent for a reload; a worker ignores it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return lambda: stopping[0]


def _status(spec_queue: int, state: str, **fields: Any) -> dict[str, Any]:
    return {"queue": spec_queue, "pid": os.getpid(), "state": state, "time": time.time(), **fields}


def gateway_worker_main(
    spec: GatewayWorkerSpec, classifier: Classifier, control: Connection, log: EventLog
) -> None:
    """The body of a gateway worker process (never returns normally: the caller exits)."""
    log = log.bind(queue=spec.queue)
    stopping = _stop_on_sigterm()
    channel = _Control(control, log)
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
            queue,
            table,
            classifier,
            spec.egress_of_gateway,
            kernel=kernel,
            pass_mark=spec.mark << 2,
            tunnel_ifindex=spec.tunnel_ifindex,
            node_mask=spec.node_marks[0],
            node_pass=spec.node_marks[1],
            node_flag=spec.node_marks[2],
        )
    except (EgressCoreError, OSError, ValueError) as error:
        channel.send("error", f"queue {spec.queue}: {error}")
        raise SystemExit(1) from None
    log.info(
        "worker_ready", restored=restored, port_range=list(spec.port_range), egress_ips=list(spec.egress_ips)
    )
    channel.send("ready", restored)

    def apply_policy(generation: int, texts: list[tuple[str, str]], parameters: dict[str, Any]) -> None:
        nonlocal table
        new_classifier = compile_texts(texts, spec.node)
        egress_ips = tuple(parameters["egress_ips"])
        new_table = None
        # No egress IP left: the table stays as it is, for the replies of flows in
        # progress (a SNAT table needs at least one address; no new flow is translated).
        if egress_ips and egress_ips != tuple(str(ip) for ip in table.egress_ips):
            # The egress IPs changed: a table with the new set takes over every entry whose
            # egress IP it still has (the others' flows end with their address).
            now = time.monotonic()
            new_table = SnatTable(
                egress_ips, port_range=spec.port_range, max_entries=spec.max_entries, timeouts=spec.timeouts
            )
            carried = new_table.restore(table.snapshot(now), now) if len(table) else 0
            log.info(
                "table_rebuilt", egress_ips=list(egress_ips), carried=carried, dropped=len(table) - carried
            )
        datapath.set_policy(new_classifier, parameters["egress_of_gateway"], new_table)
        if new_table is not None:
            table = new_table

    def write_status(state: str) -> None:
        write_atomically(
            status_path(spec.state_dir, spec.queue),
            durable=False,
            data=json.dumps(
                _status(
                    spec.queue,
                    state,
                    port_range=list(spec.port_range),
                    entries=len(table),
                    table=table.counters(),
                    datapath=datapath.counters(),
                )
            ).encode(),
        )

    next_status = 0.0
    next_resync = time.monotonic() + RESYNC_INTERVAL
    try:
        while not stopping() and not channel.gone:
            datapath.process(SLICE)
            datapath.follow_kernel()
            channel.poll(apply_policy)
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
                write_status("running")
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
        write_status("stopped")
        log.info("worker_stopped", drained=drained, snapshot_entries=saved, counters=datapath.counters())


# The gateway worker's name before the node role came.
worker_main = gateway_worker_main


def node_worker_main(
    spec: NodeWorkerSpec, classifier: Classifier, control: Connection, log: EventLog
) -> None:
    """The body of a node worker process (never returns normally: the caller exits)."""
    log = log.bind(queue=spec.queue)
    stopping = _stop_on_sigterm()
    channel = _Control(control, log)

    def decisions_for(classifier: Classifier, marks: Sequence[int | None]) -> NodeDecisions:
        return NodeDecisions(
            classifier,
            marks,
            mask=spec.mark_mask,
            pass_value=spec.pass_value,
            local_value=spec.local_value,
            drop_unknown=spec.drop_unknown,
        )

    try:
        queue = NfQueue(
            spec.queue,
            batch_size=spec.batch_size,
            copy_range=NODE_COPY_RANGE,
            max_length=spec.queue_length,
            fail_open=spec.fail_open,
            gso=True,
        )
        datapath = NodeDatapath(queue, decisions_for(classifier, spec.gateway_marks))
    except (EgressCoreError, OSError, ValueError) as error:
        channel.send("error", f"queue {spec.queue}: {error}")
        raise SystemExit(1) from None
    log.info("worker_ready", gateways=len(spec.gateway_marks))
    channel.send("ready", 0)

    def apply_policy(generation: int, texts: list[tuple[str, str]], parameters: dict[str, Any]) -> None:
        datapath.set_decisions(decisions_for(compile_texts(texts, spec.node), parameters["gateway_marks"]))

    def write_status(state: str) -> None:
        write_atomically(
            status_path(spec.state_dir, spec.queue, "node"),
            json.dumps(_status(spec.queue, state, datapath=datapath.counters())).encode(),
            durable=False,
        )

    next_status = 0.0
    try:
        while not stopping() and not channel.gone:
            datapath.process(SLICE)
            channel.poll(apply_policy)
            now = time.monotonic()
            if now >= next_status:
                write_status("running")
                next_status = now + spec.status_interval
    finally:
        drained = datapath.drain()
        queue.close()
        write_status("stopped")
        log.info("worker_stopped", drained=drained, counters=datapath.counters())
