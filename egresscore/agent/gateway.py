"""The gateway role: program the host, run one worker per queue, undo it all on exit.

Start-up order (docs/agent.md, "Gateway"): read the configuration and compile the
policies (nothing on the host changes if either is bad); remove what a crashed
earlier run left (its recorded addresses, every ``EGRESSCORE-GW-*`` chain); fork
the workers, each restoring its SNAT table and binding its queue; only then add the
egress IPs and install the rules. Stop is the reverse: workers answer what is queued
and save their tables, then the rules and the addresses egresscore added go.
"""

from __future__ import annotations

import ipaddress
import json
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from egresscore.agent import iptables
from egresscore.agent.config import AgentConfig
from egresscore.agent.iptables import GatewayRules, QueuePorts
from egresscore.agent.log import EventLog
from egresscore.agent.netlink import add_address, remove_address
from egresscore.agent.worker import WorkerSpec, status_path, worker_main, write_atomically
from egresscore.errors import EgressCoreError, PolicyError
from egresscore.policy.compiler import Compiler
from egresscore.policy.loader import load_files

__all__ = ["GatewayAgent", "GatewayPlan", "plan_gateway", "split_ports"]

OWNED_FILE = "gateway-owned.json"
LOCK_NAME = b"\0egresscore-gateway"


@dataclass(frozen=True, slots=True)
class GatewayPlan:
    """What this node does as a gateway, computed from the compiled policies."""

    compiler: Compiler
    egress_ips: tuple[ipaddress.IPv4Address, ...]
    egress_of_gateway: tuple[int | None, ...]
    destinations: tuple[ipaddress.IPv4Network, ...]


def split_ports(low: int, high: int, count: int) -> list[tuple[int, int]]:
    """``count`` contiguous port ranges covering low..high, as equal as can be."""
    total = high - low + 1
    ranges = []
    start = low
    for i in range(count):
        size = total // count + (1 if i < total % count else 0)
        ranges.append((start, start + size - 1))
        start += size
    return ranges


def plan_gateway(config: AgentConfig) -> GatewayPlan:
    """Load and compile the policies for this node and derive the gateway's work."""
    policy_set = load_files(config.policies)
    compiler = Compiler(policy_set, config.node)
    local = [i for i, gateway in enumerate(compiler.gateways) if gateway.node == config.node]
    egress_v4 = sorted(
        {g.egress_ip for i, g in enumerate(compiler.gateways) if i in local and g.egress_ip.version == 4},
        key=int,
    )
    skipped_v6 = sorted({str(compiler.gateways[i].egress_ip) for i in local} - {str(ip) for ip in egress_v4})
    if skipped_v6:
        raise PolicyError(
            f"node {config.node!r} would translate to IPv6 egress IPs {', '.join(skipped_v6)}: "
            "the gateway role handles IPv4 egress IPs only so far",
            source=config.source,
        )
    index_of: dict[object, int] = {ip: k for k, ip in enumerate(egress_v4)}
    egress_of_gateway = tuple(
        index_of.get(g.egress_ip) if g.node == config.node else None for g in compiler.gateways
    )
    local_set = set(local)
    destinations: set[ipaddress.IPv4Network] = set()
    for compiled in compiler.rules:
        if local_set.intersection(compiled.gateways[0]):
            destinations.update(n for n in compiled.rule.destinations if n.version == 4)
    return GatewayPlan(
        compiler,
        tuple(egress_v4),
        egress_of_gateway,
        tuple(sorted(destinations, key=lambda n: (int(n.network_address), n.prefixlen))),
    )


def _process_alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"egresscore" in cmdline and pid != os.getpid()


class GatewayAgent:
    """``GatewayAgent(config, log)``: ``start()``, then ``run()`` until a signal, then
    ``stop()``. ``stop()`` is safe to call after a failed ``start()``."""

    def __init__(self, config: AgentConfig, log: EventLog) -> None:
        self.config = config
        self.log = log.bind(role="gateway", node=config.node)
        self.plan: GatewayPlan | None = None
        self.workers: dict[int, tuple[BaseProcess, WorkerSpec]] = {}
        self.added_addresses: list[tuple[str, str]] = []
        self.stop_requested = False
        # Set once this run may change the host: a run refused before that point (bad
        # policies, another agent alive) must not undo anything on its way out.
        self.owns_host = False
        self._lock: socket.socket | None = None
        self.state_dir = config.state_dir
        self._context = multiprocessing.get_context("fork")

    # -- start ------------------------------------------------------------------------

    def start(self) -> None:
        config = self.config
        gateway = config.gateway
        plan = plan_gateway(config)
        self.plan = plan
        if not plan.egress_ips:
            self.log.warning("no_egress_ips", detail=f"no policy names node {config.node!r} as a gateway")
        if gateway.assign_egress_ips and plan.egress_ips and gateway.interface is None:
            raise PolicyError(
                "gateway.interface is required when gateway.assign_egress_ips is true", source=config.source
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._replace_leftovers()
        self._record_owned()
        ports = split_ports(*gateway.port_range, gateway.queue_count)
        for k, (low, high) in enumerate(ports):
            spec = WorkerSpec(
                queue=gateway.first_queue + k,
                port_range=(low, high),
                egress_ips=tuple(str(ip) for ip in plan.egress_ips),
                egress_of_gateway=plan.egress_of_gateway,
                state_dir=self.state_dir,
                max_entries=gateway.max_entries,
                timeouts=dict(gateway.timeouts),
                batch_size=gateway.batch_size,
                queue_length=gateway.queue_length,
                fail_open=gateway.fail_open,
                gso=gateway.gso,
                snapshot=gateway.snapshot,
                status_interval=config.status_interval,
                mark=gateway.mark,
                tcp_in_kernel=gateway.tcp_translation == "kernel",
            )
            self._start_worker(spec)
        rules = GatewayRules(
            egress_ips=plan.egress_ips,
            destinations=plan.destinations,
            queues=tuple(QueuePorts(spec.queue, *spec.port_range) for _, spec in self.workers.values()),
            mark=gateway.mark,
            ingress_interfaces=gateway.ingress_interfaces,
            tcp_in_kernel=gateway.tcp_translation == "kernel",
        )
        iptables.apply(rules)
        # The egress IPs come last, and go first on stop: a reply reaching a local egress IP
        # without the rules (and the kernel NAT hooks their nat chain keeps) would reach the
        # host's own TCP stack, which answers with a reset that kills the pod's connection.
        if gateway.assign_egress_ips and gateway.interface is not None:
            for ip in plan.egress_ips:
                if add_address(gateway.interface, ip):
                    self.added_addresses.append((gateway.interface, str(ip)))
                    self._record_owned()
        self.log.info(
            "started",
            egress_ips=[str(ip) for ip in plan.egress_ips],
            destinations=[str(n) for n in plan.destinations],
            queues=sorted(self.workers),
            policies=len(plan.compiler.units),
        )

    def _start_worker(self, spec: WorkerSpec) -> None:
        assert self.plan is not None
        receiver, sender = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=worker_main,
            args=(spec, self.plan.compiler.classifier, sender, self.log),
            name=f"egresscore-gateway-queue-{spec.queue}",
            daemon=False,
        )
        process.start()
        sender.close()
        self.workers[spec.queue] = (process, spec)
        message = self._wait_ready(receiver, spec.queue)
        if message[0] != "ready":
            raise EgressCoreError(str(message[1]))

    def _wait_ready(self, receiver: Connection, queue: int) -> tuple[str, Any]:
        try:
            if receiver.poll(30):
                kind, detail = receiver.recv()
                return str(kind), detail
        except EOFError:
            pass
        finally:
            receiver.close()
        return ("error", f"the worker for queue {queue} exited before it was ready")

    def _owned_path(self) -> Path:
        return self.state_dir / OWNED_FILE

    def _record_owned(self) -> None:
        record = {"pid": os.getpid(), "addresses": self.added_addresses, "started": time.time()}
        write_atomically(self._owned_path(), json.dumps(record).encode())

    def _replace_leftovers(self) -> None:
        path = self._owned_path()
        leftovers: dict[str, Any] = {}
        if path.exists():
            try:
                leftovers = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                self.log.warning("owned_record_unreadable", path=str(path), error=str(error))
            pid = leftovers.get("pid")
            if isinstance(pid, int) and _process_alive(pid):
                raise EgressCoreError(
                    f"another egresscore gateway (pid {pid}) is running with state directory {self.state_dir}"
                )
        # One gateway per network namespace, whatever its state directory: the chains and
        # queues are the namespace's. An abstract socket's name is per namespace and goes
        # away with its process, crashed or not.
        self._lock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._lock.bind(LOCK_NAME)
        except OSError:
            self._lock.close()
            self._lock = None
            raise EgressCoreError(
                "another egresscore gateway is running in this network namespace "
                f"(the abstract socket @{LOCK_NAME[1:].decode()} is taken)"
            ) from None
        self.owns_host = True
        removed_addresses = []
        for interface, address in leftovers.get("addresses", []):
            if remove_address(interface, ipaddress.ip_address(address)):
                removed_addresses.append(f"{address} on {interface}")
        removed_rules = iptables.remove()
        if removed_addresses or removed_rules:
            self.log.warning(
                "replaced_leftovers",
                previous_pid=leftovers.get("pid"),
                addresses=removed_addresses,
                iptables_rules=removed_rules,
            )

    # -- run --------------------------------------------------------------------------

    def request_stop(self, signum: int = 0, frame: object = None) -> None:
        self.stop_requested = True

    def run(self) -> None:
        """Supervise the workers until a stop is requested. A worker that dies is
        started again (its queue drops packets meanwhile: no listener, no bypass)."""
        while not self.stop_requested:
            time.sleep(0.2)
            for queue, (process, spec) in list(self.workers.items()):
                if not process.is_alive() and not self.stop_requested:
                    self.log.error("worker_died", queue=queue, exitcode=process.exitcode)
                    del self.workers[queue]
                    try:
                        self._start_worker(spec)
                    except EgressCoreError as error:
                        self.log.error("worker_restart_failed", queue=queue, error=str(error))

    # -- stop -------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the workers (they save their tables), then remove the rules and the
        addresses this run added. Never raises for a step that fails: it logs and goes on."""
        if not self.owns_host:
            return
        for process, _ in self.workers.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        for queue, (process, _) in self.workers.items():
            process.join(15)
            if process.is_alive():
                self.log.error("worker_kill", queue=queue, detail="did not stop within 15 s")
                process.kill()
                process.join(5)
        self.workers.clear()
        for interface, address in self.added_addresses:
            try:
                remove_address(interface, ipaddress.ip_address(address))
            except EgressCoreError as error:
                self.log.error(
                    "address_remove_failed", address=address, interface=interface, error=str(error)
                )
        self.added_addresses.clear()
        try:
            iptables.remove()
        except EgressCoreError as error:
            self.log.error("iptables_remove_failed", error=str(error))
        self._owned_path().unlink(missing_ok=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        self.log.info("stopped")

    def status(self) -> dict[str, Any]:
        """The workers' last status files, by queue."""
        result: dict[str, Any] = {}
        for queue in sorted(self.workers):
            try:
                result[str(queue)] = json.loads(status_path(self.state_dir, queue).read_text())
            except (OSError, ValueError):
                result[str(queue)] = None
        return result
