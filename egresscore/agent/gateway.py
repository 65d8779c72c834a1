"""The gateway role: program the host, run one worker per queue, follow policy reloads.

Start (docs/agent.md, "Start, stop, restart"): the agent has read the configuration and
compiled the policies (nothing on the host changes if either is bad). The gateway
adopts what an earlier run left (its recorded addresses; its chains are replaced in the
same transaction that installs the new ones, so there is no moment without rules),
creates the tunnel link when one is configured, forks the workers (each restores its
SNAT table and binds its queue), installs the rules, and only then adds the egress IPs.

Reload: add before remove. The rules first cover the old and the new egress IPs and
destinations together, new egress IPs are added, the workers take the new policies,
then the rules narrow to the new set and the egress IPs no longer used go.

Stop: the workers answer what is queued and save their tables. With ``failure_mode:
closed`` the rules, the addresses and the tunnel stay: selected flows are dropped while
no worker answers, and TCP flows the kernel translates go on. With ``open``, or on
``egresscore cleanup``, everything egresscore added is removed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from egresscore.agent import iptables
from egresscore.agent.config import AgentConfig
from egresscore.agent.iptables import GatewayRules, QueuePorts
from egresscore.agent.log import EventLog
from egresscore.agent.netlink import add_address, has_address, remove_address
from egresscore.agent.process import WorkerHandle, restart_dead
from egresscore.agent.tunnel import TunnelSpec, ensure_tunnel, read_sysctl, remove_tunnel
from egresscore.agent.worker import (
    GatewayWorkerSpec,
    gateway_worker_main,
    status_path,
    write_atomically,
)
from egresscore.errors import EgressCoreError, PolicyError
from egresscore.policy.compiler import Compiler

__all__ = ["GatewayPlan", "GatewayRole", "cleanup_gateway", "plan_gateway", "split_ports", "tunnel_spec"]

OWNED_FILE = "gateway-owned.json"


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


def plan_gateway(config: AgentConfig, compiler: Compiler | None = None) -> GatewayPlan:
    """The gateway's work on this node from the compiled policies (compiled here from
    ``config.policies`` when no compiler is given). Raises :class:`PolicyError` for
    what the gateway cannot do (IPv6 egress IPs)."""
    if compiler is None:
        from egresscore.policy.loader import load_files

        compiler = Compiler(load_files(config.policies), config.node)
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


def tunnel_spec(config: AgentConfig, compiler: Compiler, *, with_address: bool) -> TunnelSpec | None:
    """The VXLAN link this host needs, or None when no tunnel is configured."""
    tunnel = config.tunnel
    if tunnel is None or tunnel.underlay_interface is None:
        return None
    local = tunnel.local_address
    if local is None:
        node = next((n for n in compiler.inventory.nodes if n.name == config.node), None)
        v4 = [a for a in (node.addresses if node else ()) if a.version == 4]
        if not v4:
            raise PolicyError(
                f"node {config.node!r} has no IPv4 address in the inventory: expected one for the tunnel, "
                "or tunnel.local_address",
                source=config.source,
                path="tunnel.local_address",
            )
        local = ipaddress.IPv4Address(str(v4[0]))
    return TunnelSpec(
        device=tunnel.device,
        underlay_interface=tunnel.underlay_interface,
        local=local,
        vni=tunnel.vni,
        port=tunnel.port,
        mtu=tunnel.mtu,
        address=tunnel.address if with_address else None,
    )


def _by_address(ips: set[ipaddress.IPv4Address]) -> tuple[ipaddress.IPv4Address, ...]:
    return tuple(sorted(ips, key=int))


def _by_network(networks: set[ipaddress.IPv4Network]) -> tuple[ipaddress.IPv4Network, ...]:
    return tuple(sorted(networks, key=lambda n: (int(n.network_address), n.prefixlen)))


def read_record(path: Path, log: EventLog) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        log.warning("owned_record_unreadable", path=str(path), error=str(error))
        return {}
    return record if isinstance(record, dict) else {}


def process_alive(pid: object) -> bool:
    """Whether ``pid`` is another live egresscore process."""
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"egresscore" in cmdline


class GatewayRole:
    """The gateway role of one agent: ``start(compiler, texts)``, ``reload(...)`` on
    new policies, ``supervise()`` now and then, ``stop(keep=...)``."""

    name = "gateway"

    def __init__(self, config: AgentConfig, log: EventLog, *, with_node: bool = False) -> None:
        self.config = config
        self.log = log.bind(role="gateway", node=config.node)
        self.with_node = with_node
        self.plan: GatewayPlan | None = None
        self.workers: dict[int, WorkerHandle] = {}
        self.owned_addresses: list[tuple[str, str]] = []
        self.tunnel_index: int | None = None
        self.state_dir = config.state_dir
        self.owns_host = False

    # -- checks and plans (no host change) --------------------------------------------

    def prepare(self, compiler: Compiler) -> GatewayPlan:
        plan = plan_gateway(self.config, compiler)
        gateway = self.config.gateway
        if gateway.assign_egress_ips and plan.egress_ips and gateway.interface is None:
            raise PolicyError(
                "gateway.interface is required when gateway.assign_egress_ips is true",
                source=self.config.source,
                path="gateway.interface",
            )
        return plan

    def check_host(self) -> None:
        record = read_record(self.state_dir / OWNED_FILE, self.log)
        if process_alive(record.get("pid")):
            raise EgressCoreError(
                f"another egresscore gateway (pid {record['pid']}) is running with state directory "
                f"{self.state_dir}"
            )
        tunnel = self.config.tunnel
        if (
            tunnel is not None
            and tunnel.underlay_interface is not None
            and read_sysctl("all", "rp_filter") == "1"
        ):
            raise EgressCoreError(
                "net.ipv4.conf.all.rp_filter is 1 (strict): pods' packets decapsulated from the tunnel would "
                "be dropped, since replies to them are routed through the CNI; expected 0 or 2 (loose)"
            )

    def ingress_interfaces(self) -> tuple[str, ...]:
        gateway, tunnel = self.config.gateway, self.config.tunnel
        interfaces = list(gateway.ingress_interfaces)
        if tunnel is not None and tunnel.underlay_interface is not None:
            interfaces.append(tunnel.device)
            if self.with_node:
                interfaces.extend(self.config.redirect.pod_interfaces)
        return tuple(dict.fromkeys(interfaces))

    def rules_for(
        self, egress_ips: tuple[ipaddress.IPv4Address, ...], destinations: tuple[ipaddress.IPv4Network, ...]
    ) -> GatewayRules:
        gateway, tunnel = self.config.gateway, self.config.tunnel
        return GatewayRules(
            egress_ips=egress_ips,
            destinations=destinations,
            queues=tuple(QueuePorts(h.spec.queue, *h.spec.port_range) for h in self.workers.values()),
            mark=gateway.mark,
            ingress_interfaces=self.ingress_interfaces(),
            tcp_in_kernel=gateway.tcp_translation == "kernel",
            bypass=not self.config.fail_closed,
            tunnel_interfaces=(tunnel.device,)
            if tunnel is not None and self.tunnel_index is not None
            else (),
            node_marks=self._node_marks(),
        )

    def _node_marks(self) -> tuple[int, int, int]:
        redirect = self.config.redirect
        if not self.with_node:
            return (0, 0, 0)
        return (redirect.mark_mask, redirect.pass_value(), redirect.redirect_flag())

    def _spec(self, queue: int, ports: tuple[int, int], plan: GatewayPlan) -> GatewayWorkerSpec:
        config, gateway = self.config, self.config.gateway
        return GatewayWorkerSpec(
            queue=queue,
            port_range=ports,
            egress_ips=tuple(str(ip) for ip in plan.egress_ips),
            egress_of_gateway=plan.egress_of_gateway,
            state_dir=self.state_dir,
            max_entries=gateway.max_entries,
            timeouts=dict(gateway.timeouts),
            batch_size=gateway.batch_size,
            queue_length=gateway.queue_length,
            fail_open=not config.fail_closed,
            gso=gateway.gso,
            snapshot=gateway.snapshot,
            status_interval=config.status_interval,
            node=config.node,
            mark=gateway.mark,
            tcp_in_kernel=gateway.tcp_translation == "kernel",
            tunnel_ifindex=self.tunnel_index,
            node_marks=self._node_marks(),
        )

    # -- start ------------------------------------------------------------------------

    def start(self, compiler: Compiler, plan: GatewayPlan) -> None:
        config = self.config
        self.plan = plan
        if not plan.egress_ips:
            self.log.warning("no_egress_ips", detail=f"no policy names node {config.node!r} as a gateway")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        record = read_record(self.state_dir / OWNED_FILE, self.log)
        leftover_rules = bool(iptables.find_owned())
        self.owns_host = True
        recorded = [(str(i), str(a)) for i, a in record.get("addresses", []) if isinstance(i, str)]
        self.owned_addresses = list(recorded)
        self._record()
        spec = tunnel_spec(config, compiler, with_address=True)
        if spec is not None:
            self.tunnel_index, _mtu = ensure_tunnel(spec)
        self._ensure_workers(compiler, plan, strict=True)
        # One transaction replaces whatever chains an earlier run left.
        iptables.apply(self.rules_for(plan.egress_ips, plan.destinations))
        # The egress IPs come after the rules, and go before them: a reply reaching a local
        # egress IP without the rules (and the kernel NAT hooks their nat chain keeps) would
        # reach the host's own TCP stack, which answers with a reset.
        self._add_addresses(plan.egress_ips)
        removed = self._remove_addresses_except(plan.egress_ips)
        if leftover_rules or recorded:
            self.log.warning(
                "adopted_leftovers",
                previous_pid=record.get("pid"),
                iptables_rules=leftover_rules,
                addresses=[f"{a} on {i}" for i, a in recorded],
                removed_addresses=removed,
            )
        self.log.info(
            "started",
            egress_ips=[str(ip) for ip in plan.egress_ips],
            destinations=[str(n) for n in plan.destinations],
            queues=sorted(self.workers),
            policies=len(compiler.units),
            tunnel=None if spec is None else spec.device,
        )

    def _ensure_workers(self, compiler: Compiler, plan: GatewayPlan, *, strict: bool) -> set[int]:
        """Start the workers once the policies give this node an egress IP (a SNAT table
        needs one); returns the queues started. Once started they stay, also when a
        reload takes every egress IP away: their tables keep the flows in progress. With
        ``strict`` (the start) a worker that cannot start is an error; in a reload it is
        left to supervise(), which retries."""
        if self.workers or not plan.egress_ips:
            return set()
        gateway = self.config.gateway
        started = set()
        for k, ports in enumerate(split_ports(*gateway.port_range, gateway.queue_count)):
            spec = self._spec(gateway.first_queue + k, ports, plan)
            try:
                self._start_worker(spec, compiler)
            except EgressCoreError as error:
                if strict:
                    raise
                self.log.error("worker_start_failed", queue=spec.queue, error=str(error))
            else:
                started.add(spec.queue)
        return started

    def _start_worker(self, spec: GatewayWorkerSpec, compiler: Compiler) -> None:
        handle = WorkerHandle(f"egresscore-gateway-queue-{spec.queue}", gateway_worker_main, spec, self.log)
        self.workers[spec.queue] = handle
        handle.start(compiler.classifier)

    def _record(self) -> None:
        record = {"pid": os.getpid(), "addresses": self.owned_addresses, "started": time.time()}
        write_atomically(self.state_dir / OWNED_FILE, json.dumps(record).encode())

    def _add_addresses(self, ips: tuple[ipaddress.IPv4Address, ...]) -> None:
        gateway = self.config.gateway
        if not gateway.assign_egress_ips or gateway.interface is None:
            return
        for ip in ips:
            owned = (gateway.interface, str(ip))
            if owned in self.owned_addresses or has_address(gateway.interface, ip):
                continue  # ours from before, or someone else's (then it stays theirs)
            # Recorded before it is added: a crash in between leaves an address that the
            # next run or a cleanup still knows to be egresscore's.
            self.owned_addresses.append(owned)
            self._record()
            if not add_address(gateway.interface, ip):
                self.owned_addresses.remove(owned)  # added by someone else meanwhile
                self._record()

    def _remove_addresses_except(self, keep: tuple[ipaddress.IPv4Address, ...]) -> list[str]:
        wanted = {str(ip) for ip in keep}
        interface = self.config.gateway.interface
        removed = []
        for owned in list(self.owned_addresses):
            name, address = owned
            if address in wanted and name == interface:
                continue
            try:
                remove_address(name, ipaddress.ip_address(address))
            except EgressCoreError as error:
                self.log.error("address_remove_failed", address=address, interface=name, error=str(error))
                continue
            self.owned_addresses.remove(owned)
            removed.append(f"{address} on {name}")
            self._record()
        return removed

    # -- reload -----------------------------------------------------------------------

    def reload(
        self, compiler: Compiler, plan: GatewayPlan, generation: int, texts: list[tuple[str, str]]
    ) -> list[str]:
        """Apply a new policy generation (add before remove); returns the problems met."""
        old = self.plan
        assert old is not None
        problems: list[str] = []
        # Workers first (the policies may name this node a gateway for the first time):
        # the rules below queue to them, and the egress IPs need the rules.
        fresh = self._ensure_workers(compiler, plan, strict=False)
        union = self.rules_for(
            _by_address(set(old.egress_ips) | set(plan.egress_ips)),
            _by_network(set(old.destinations) | set(plan.destinations)),
        )
        iptables.apply(union)
        self._add_addresses(plan.egress_ips)
        parameters = {
            "egress_ips": [str(ip) for ip in plan.egress_ips],
            "egress_of_gateway": list(plan.egress_of_gateway),
        }
        self.plan = plan
        for queue, handle in list(self.workers.items()):
            spec = self._spec(queue, handle.spec.port_range, plan)
            if not plan.egress_ips:
                # A restart must still build a table: it keeps the addresses it had.
                spec = replace(spec, egress_ips=handle.spec.egress_ips)
            handle.spec = spec
            if queue in fresh:
                continue  # forked with this generation already
            problem = handle.reload(generation, texts, parameters)
            if problem is not None:
                # A worker that could not take the new policies is stopped (it saves its
                # table); supervise() starts it again with them, and restores the table.
                problems.append(problem)
                self.log.error("worker_reload_failed", queue=queue, error=problem)
                handle.stop()
        # Addresses go before the rules that answer for them: a reply reaching a local egress
        # IP without its rule would reach the host's own stack.
        self._remove_addresses_except(plan.egress_ips)
        iptables.apply(self.rules_for(plan.egress_ips, plan.destinations))
        return problems

    # -- run --------------------------------------------------------------------------

    def supervise(self, compiler: Compiler) -> None:
        """Start again a worker that died (its queue drops packets meanwhile)."""
        # The classifier of the generation the workers' specs were made for: a reload that
        # failed half-way has set them, not the agent's compiler.
        current = self.plan.compiler if self.plan is not None else compiler
        restart_dead(self.workers, current.classifier, self.log)

    def status(self) -> dict[str, Any]:
        """The workers' last status files, by queue."""
        result: dict[str, Any] = {}
        for queue in sorted(self.workers):
            try:
                result[str(queue)] = json.loads(status_path(self.state_dir, queue).read_text())
            except (OSError, ValueError):
                result[str(queue)] = None
        return result

    # -- stop -------------------------------------------------------------------------

    def stop(self, keep: bool) -> None:
        """Stop the workers (they save their tables); with ``keep`` the rules, addresses
        and tunnel stay (fail closed until the next start), else they are removed.
        Never raises for a step that fails: it logs and goes on."""
        if not self.owns_host:
            return
        for handle in self.workers.values():
            handle.signal_stop()
        for handle in self.workers.values():
            handle.join(15)
        self.workers.clear()
        if keep:
            self.log.info("stopped", kept=True)
            return
        self._remove_addresses_except(())
        try:
            iptables.remove()
        except EgressCoreError as error:
            self.log.error("iptables_remove_failed", error=str(error))
        if self.config.tunnel is not None and not self.with_node:
            try:
                remove_tunnel(self.config.tunnel.device)
            except EgressCoreError as error:
                self.log.error("tunnel_remove_failed", error=str(error))
        (self.state_dir / OWNED_FILE).unlink(missing_ok=True)
        self.log.info("stopped", kept=False)


def cleanup_gateway(config: AgentConfig, log: EventLog) -> list[str]:
    """Remove everything a gateway left on this host (its recorded addresses, its
    chains, its tunnel link); returns what was removed."""
    removed: list[str] = []
    failed = False
    path = config.state_dir / OWNED_FILE
    record = read_record(path, log)
    steps: list[tuple[str, Any]] = [
        (
            f"address {address} on {interface}",
            lambda i=interface, a=address: remove_address(i, ipaddress.ip_address(a)),
        )
        for interface, address in record.get("addresses", [])
    ]
    steps.append((f"iptables chains {iptables.CHAIN_PREFIX}*", iptables.remove))
    if config.tunnel is not None:
        steps.append((f"link {config.tunnel.device}", lambda d=config.tunnel.device: remove_tunnel(d)))
    # Every step is tried, whatever the one before did.
    for what, step in steps:
        try:
            if step():
                removed.append(what)
        except (EgressCoreError, ValueError) as error:
            failed = True
            log.error("remove_failed", what=what, error=str(error))
    if not failed:
        path.unlink(missing_ok=True)
    for snapshot in config.state_dir.glob("snat-queue-*.snapshot"):
        snapshot.unlink(missing_ok=True)
        removed.append(f"snapshot {snapshot.name}")
    return removed
