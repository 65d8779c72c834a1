"""The node role: decide each local pod's flow once, redirect it through the tunnel.

The rules (egresscore/agent/iptables.py, ``EGRESSCORE-NODE-*``) queue the first packet
of a local pod's flow to a policy destination; a worker (egresscore.core.node) answers
it with the decision in the mark; the kernel saves the mark on the connection and
restores it on every later packet, which never reaches user space. Per gateway the
node has one *slot*: a mark value, a routing table and an ``ip rule`` that routes the
marked packets into the VXLAN tunnel towards the gateway's underlay address
(egresscore/agent/tunnel.py).

Slots belong to tunnel endpoints (a gateway's underlay address) and outlive policy
changes: a flow keeps the slot it was given, so a slot whose gateway no policy names
any more stays (retired) until the kernel holds no connection marked with it. On a
restart the slots are read back from the kernel's rules and tables.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import time
from dataclasses import dataclass, replace
from typing import Any

from egresscore.agent import iptables
from egresscore.agent.config import AgentConfig
from egresscore.agent.gateway import process_alive, read_record, tunnel_spec
from egresscore.agent.iptables import NodeRules
from egresscore.agent.log import EventLog
from egresscore.agent.process import WorkerHandle, restart_dead
from egresscore.agent.tunnel import (
    SlotRoute,
    ensure_tunnel,
    installed_slots,
    remove_guard_rules,
    remove_slot,
    remove_tunnel,
    set_guard_rules,
    set_peers,
    set_slot,
)
from egresscore.agent.worker import NodeWorkerSpec, node_worker_main, status_path, write_atomically
from egresscore.errors import EgressCoreError, KernelError
from egresscore.policy.compiler import Compiler

__all__ = ["NodePlan", "NodeRole", "cleanup_node", "plan_node"]

OWNED_FILE = "node-owned.json"
# Seconds between checks of whether a retired slot's connections are all gone.
RETIRE_CHECK_INTERVAL = 10.0
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class NodePlan:
    """What the node role does, computed from the compiled policies."""

    compiler: Compiler
    # Every destination a policy names, collapsed per family: the rules queue undecided
    # flows of local pods to these.
    destinations: tuple[IPNetwork, ...]
    # Per classifier gateway: the tunnel endpoint its flows are routed to (None: the
    # gateway is this node, or has no known address).
    endpoints: tuple[ipaddress.IPv4Address | None, ...]
    # Gateway nodes with no IPv4 address to tunnel to: their flows are dropped.
    unreachable: tuple[str, ...]
    # Whether a policy makes this node a gateway itself.
    local_gateway: bool


def _collapse(networks: set[IPNetwork]) -> tuple[IPNetwork, ...]:
    result: list[IPNetwork] = []
    result.extend(ipaddress.collapse_addresses(n for n in networks if isinstance(n, ipaddress.IPv4Network)))
    result.extend(ipaddress.collapse_addresses(n for n in networks if isinstance(n, ipaddress.IPv6Network)))
    return tuple(result)


def plan_node(config: AgentConfig, compiler: Compiler) -> NodePlan:
    tunnel = config.tunnel
    overrides = tunnel.endpoints if tunnel is not None else {}
    addresses = {node.name: node.addresses for node in compiler.inventory.nodes}
    local = tunnel.local_address if tunnel is not None else None
    endpoints: list[ipaddress.IPv4Address | None] = []
    unreachable: set[str] = set()
    local_gateway = False
    for gateway in compiler.gateways:
        if gateway.node == config.node:
            local_gateway = True
            endpoints.append(None)
            continue
        endpoint = overrides.get(gateway.node)
        if endpoint is None:
            v4 = [a for a in addresses.get(gateway.node, ()) if a.version == 4]
            endpoint = ipaddress.IPv4Address(str(v4[0])) if v4 else None
        if endpoint is None or endpoint == local:
            unreachable.add(gateway.node)
            endpoints.append(None)
        else:
            endpoints.append(endpoint)
    destinations: set[IPNetwork] = set()
    for compiled in compiler.rules:
        destinations.update(compiled.rule.destinations)
    return NodePlan(
        compiler, _collapse(destinations), tuple(endpoints), tuple(sorted(unreachable)), local_gateway
    )


class NodeRole:
    """The node role of one agent: ``start(compiler, plan)``, ``reload(...)``,
    ``supervise()``, ``stop(keep=...)``."""

    name = "node"

    def __init__(self, config: AgentConfig, log: EventLog, *, with_gateway: bool = False) -> None:
        self.config = config
        self.redirect = config.redirect
        self.log = log.bind(role="node", node=config.node)
        self.with_gateway = with_gateway
        self.plan: NodePlan | None = None
        self.workers: dict[int, WorkerHandle] = {}
        self.slots: dict[int, SlotRoute] = {}
        self.retired: set[int] = set()
        self.next_retire_check = 0.0
        self.mtu = 1450
        self.state_dir = config.state_dir
        self.owns_host = False

    # -- checks and plans (no host change) --------------------------------------------

    def prepare(self, compiler: Compiler) -> NodePlan:
        plan = plan_node(self.config, compiler)
        tunnel_spec(self.config, compiler, with_address=False)  # raises when no local address is known
        return plan

    def check_host(self) -> None:
        record = read_record(self.state_dir / OWNED_FILE, self.log)
        if process_alive(record.get("pid")):
            raise EgressCoreError(
                f"another egresscore node agent (pid {record['pid']}) is running with state directory "
                f"{self.state_dir}"
            )

    def _settings(self) -> dict[str, Any]:
        redirect = self.redirect
        return {
            "rule_priority": redirect.rule_priority,
            "mark_mask": redirect.mark_mask,
            "route_table_base": redirect.route_table_base,
            "slot_count": redirect.slot_count(),
            "device": self.config.tunnel.device if self.config.tunnel else None,
        }

    def _record(self) -> None:
        record = {"pid": os.getpid(), "started": time.time(), **self._settings()}
        write_atomically(self.state_dir / OWNED_FILE, json.dumps(record).encode())

    def _route(self, slot: int, endpoint: ipaddress.IPv4Address) -> SlotRoute:
        redirect = self.redirect
        return SlotRoute(
            slot,
            endpoint,
            redirect.route_table_base + slot,
            redirect.slot_value(slot),
            redirect.mark_mask,
            redirect.rule_priority,
        )

    def _assign_slots(self, plan: NodePlan) -> list[ipaddress.IPv4Address]:
        """Give every endpoint of ``plan`` a slot (keeping the ones it has); returns the
        endpoints that found none."""
        by_endpoint = {route.endpoint: slot for slot, route in self.slots.items()}
        missing = []
        for endpoint in dict.fromkeys(e for e in plan.endpoints if e is not None):
            if endpoint in by_endpoint:
                self.retired.discard(by_endpoint[endpoint])
                continue
            free = next((s for s in range(self.redirect.slot_count()) if s not in self.slots), None)
            if free is None:
                missing.append(endpoint)
                continue
            self.slots[free] = self._route(free, endpoint)
            by_endpoint[endpoint] = free
        return missing

    def _retire_unused(self, plan: NodePlan) -> None:
        """Slots no endpoint of ``plan`` uses are retired (called once every worker decides
        with ``plan``, so that no new flow gets a retired slot's mark)."""
        wanted = {e for e in plan.endpoints if e is not None}
        for slot, route in self.slots.items():
            if route.endpoint not in wanted and slot not in self.retired:
                self.retired.add(slot)
                self.log.info("slot_retired", slot=slot, endpoint=str(route.endpoint))

    def gateway_marks(self, plan: NodePlan) -> list[int | None]:
        by_endpoint = {route.endpoint: route.mark for route in self.slots.values()}
        return [None if e is None else by_endpoint.get(e) for e in plan.endpoints]

    def _program_slots(self) -> None:
        set_guard_rules(self.redirect.rule_priority, self.redirect.redirect_flag())
        device = self.tunnel_device()
        set_peers(device, {route.endpoint for route in self.slots.values()})
        for route in self.slots.values():
            set_slot(route, device)

    def tunnel_device(self) -> str:
        assert self.config.tunnel is not None
        return self.config.tunnel.device

    def rules_for(self, destinations: tuple[IPNetwork, ...]) -> NodeRules:
        redirect = self.redirect
        return NodeRules(
            pod_interfaces=redirect.pod_interfaces,
            destinations=destinations,
            first_queue=redirect.first_queue,
            queue_count=redirect.queue_count,
            mark_mask=redirect.mark_mask,
            redirect_flag=redirect.redirect_flag(),
            mss=self.mtu - 40 if redirect.mss_clamp else None,
            bypass=not self.config.fail_closed,
            tunnel_interface=None if self.with_gateway else self.tunnel_device(),
        )

    def _apply_rules(self, destinations: tuple[IPNetwork, ...]) -> None:
        rules = self.rules_for(destinations)
        iptables.apply_node(rules, 4)
        if any(n.version == 6 for n in destinations):
            iptables.apply_node(rules, 6)
        else:
            # No ip6tables on this host means nothing of ours in it either.
            with contextlib.suppress(KernelError):
                iptables.remove_node(6)

    def _spec(self, queue: int, plan: NodePlan) -> NodeWorkerSpec:
        config, redirect = self.config, self.redirect
        return NodeWorkerSpec(
            queue=queue,
            node=config.node,
            state_dir=self.state_dir,
            batch_size=redirect.batch_size,
            queue_length=redirect.queue_length,
            fail_open=not config.fail_closed,
            status_interval=config.status_interval,
            mark_mask=redirect.mark_mask,
            pass_value=redirect.pass_value(),
            local_value=redirect.local_value() if self.with_gateway else None,
            drop_unknown=redirect.unknown_sources == "drop",
            gateway_marks=tuple(self.gateway_marks(plan)),
        )

    # -- start ------------------------------------------------------------------------

    def start(self, compiler: Compiler, plan: NodePlan) -> None:
        config, redirect = self.config, self.redirect
        self.plan = plan
        self.state_dir.mkdir(parents=True, exist_ok=True)
        record = read_record(self.state_dir / OWNED_FILE, self.log)
        self.owns_host = True
        previous = {key: record.get(key) for key in self._settings()}
        if record and previous != self._settings():
            # Another mark mask, table range or rule priority than the last run: its slots
            # cannot be read back under the new settings, so they go now.
            self._remove_slots_of(previous)
        self._record()
        spec = tunnel_spec(config, compiler, with_address=self.with_gateway)
        assert spec is not None
        _index, self.mtu = ensure_tunnel(spec)
        self.slots = installed_slots(
            redirect.rule_priority, redirect.mark_mask, redirect.route_table_base, redirect.slot_count()
        )
        adopted = sorted(self.slots)
        missing = self._assign_slots(plan)
        self._retire_unused(plan)
        self._program_slots()
        for k in range(redirect.queue_count):
            self._start_worker(self._spec(redirect.first_queue + k, plan), compiler)
        # One transaction per family replaces whatever chains an earlier run left.
        self._apply_rules(plan.destinations)
        self._warn_about(plan, missing)
        self.log.info(
            "started",
            gateways={str(r.endpoint): r.slot for r in self.slots.values() if r.slot not in self.retired},
            retired_slots=sorted(self.retired),
            adopted_slots=adopted,
            destinations=[str(n) for n in plan.destinations],
            queues=sorted(self.workers),
            tunnel=spec.device,
            tunnel_mtu=self.mtu,
            policies=len(compiler.units),
        )

    def _warn_about(self, plan: NodePlan, missing: list[ipaddress.IPv4Address]) -> None:
        tunnel = self.config.tunnel
        known = {node.name for node in plan.compiler.inventory.nodes}
        unknown = sorted(set(tunnel.endpoints) - known) if tunnel is not None else []
        if unknown:
            self.log.warning(
                "unknown_endpoint_nodes",
                nodes=unknown,
                detail="tunnel.endpoints names nodes the inventory does not list (a typo?)",
            )
        if plan.unreachable:
            self.log.warning(
                "gateways_unreachable",
                gateways=list(plan.unreachable),
                detail="no IPv4 address to tunnel to (inventory, tunnel.endpoints): their flows are dropped",
            )
        if missing:
            self.log.error(
                "slots_exhausted",
                endpoints=[str(e) for e in missing],
                detail=f"redirect.mark_mask gives {self.redirect.slot_count()} gateway slots: their flows "
                "are dropped",
            )
        if plan.local_gateway and not self.with_gateway:
            self.log.warning(
                "gateway_not_running_here",
                detail=f"policies make {self.config.node!r} a gateway: run --role both, or its pods' "
                "flows through it are dropped",
            )

    def _start_worker(self, spec: NodeWorkerSpec, compiler: Compiler) -> None:
        handle = WorkerHandle(f"egresscore-node-queue-{spec.queue}", node_worker_main, spec, self.log)
        self.workers[spec.queue] = handle
        handle.start(compiler.classifier)

    # -- reload -----------------------------------------------------------------------

    def reload(
        self, compiler: Compiler, plan: NodePlan, generation: int, texts: list[tuple[str, str]]
    ) -> list[str]:
        """Apply a new policy generation, adding before removing; returns the problems."""
        old = self.plan
        assert old is not None
        problems: list[str] = []
        missing = self._assign_slots(plan)
        self._program_slots()
        # Destinations of both generations are queued while the workers change over, so
        # that a new flow to either is decided by one of them, never let through undecided.
        self._apply_rules(_collapse(set(old.destinations) | set(plan.destinations)))
        self.plan = plan
        parameters = {"gateway_marks": self.gateway_marks(plan)}
        for queue, handle in list(self.workers.items()):
            handle.spec = self._spec(queue, plan)
            problem = handle.reload(generation, texts, parameters)
            if problem is not None:
                # Stopped; supervise() starts it again, forked with the new policies.
                problems.append(problem)
                self.log.error("worker_reload_failed", queue=queue, error=problem)
                handle.stop()
        self._retire_unused(plan)
        self._apply_rules(plan.destinations)
        self._warn_about(plan, missing)
        return problems

    # -- run --------------------------------------------------------------------------

    def supervise(self, compiler: Compiler) -> None:
        # The classifier of the generation the workers' specs were made for: a reload that
        # failed half-way has set them, not the agent's compiler.
        current = self.plan.compiler if self.plan is not None else compiler
        restart_dead(self.workers, current.classifier, self.log)
        now = time.monotonic()
        if self.retired and now >= self.next_retire_check:
            self.next_retire_check = now + RETIRE_CHECK_INTERVAL
            self._free_retired()

    def _free_retired(self) -> None:
        from pyroute2 import NFCTSocket

        for slot in sorted(self.retired):
            route = self.slots[slot]
            try:
                with NFCTSocket() as conntrack:
                    live = sum(1 for _ in conntrack.dump(mark=route.mark, mark_mask=route.mask))
            except Exception as error:  # a failed check keeps the slot: tried again later
                self.log.warning("slot_check_failed", slot=slot, error=str(error))
                continue
            if live:
                continue
            remove_slot(route)
            del self.slots[slot]
            self.retired.discard(slot)
            set_peers(self.tunnel_device(), {r.endpoint for r in self.slots.values()})
            self.log.info("slot_freed", slot=slot, endpoint=str(route.endpoint))

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for queue in sorted(self.workers):
            try:
                result[str(queue)] = json.loads(status_path(self.state_dir, queue, "node").read_text())
            except (OSError, ValueError):
                result[str(queue)] = None
        return result

    # -- stop -------------------------------------------------------------------------

    def stop(self, keep: bool) -> None:
        """Stop the workers; with ``keep`` everything else stays: new selected flows are
        dropped until the next start (no listener, no bypass) and decided flows go on
        through their tunnels. Without, the rules, routes and tunnel are removed."""
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
        _removed, problems = remove_node_state(self.config, self._settings())
        for problem in problems:
            self.log.error("remove_failed", error=problem)
        (self.state_dir / OWNED_FILE).unlink(missing_ok=True)
        self.log.info("stopped", kept=False)

    def _remove_slots_of(self, settings: dict[str, Any]) -> None:
        try:
            for route in installed_slots(
                int(settings["rule_priority"]),
                int(settings["mark_mask"]),
                int(settings["route_table_base"]),
                int(settings["slot_count"]),
            ).values():
                remove_slot(route)
        except (KeyError, TypeError, ValueError, EgressCoreError) as error:
            self.log.warning("previous_slots_unreadable", error=str(error))


def remove_node_state(config: AgentConfig, settings: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Remove the node role's rules (both families), slots and tunnel; returns what was
    removed and the problems met (it goes on after each)."""
    removed: list[str] = []
    problems: list[str] = []
    for family in (4, 6):
        try:
            if iptables.remove_node(family):
                removed.append(f"{'ip6tables' if family == 6 else 'iptables'} chains {iptables.NODE_PREFIX}*")
        except KernelError as error:
            if family == 4:
                problems.append(str(error))
    try:
        slots = installed_slots(
            settings["rule_priority"],
            settings["mark_mask"],
            settings["route_table_base"],
            settings["slot_count"],
        )
        for slot, route in sorted(slots.items()):
            remove_slot(route)
            removed.append(f"slot {slot}: rule and table {route.table} (to {route.endpoint})")
    except EgressCoreError as error:
        problems.append(str(error))
    try:
        # The flag of the mark field the recorded run used, which this configuration may not.
        flag = replace(config.redirect, mark_mask=int(settings["mark_mask"])).redirect_flag()
        if remove_guard_rules(int(settings["rule_priority"]), flag):
            removed.append(
                f"the rules at priorities {settings['rule_priority'] + 1} and {settings['rule_priority'] + 2}"
            )
    except (EgressCoreError, KeyError, TypeError, ValueError) as error:
        problems.append(str(error))
    if settings.get("device"):
        try:
            if remove_tunnel(settings["device"]):
                removed.append(f"link {settings['device']}")
        except EgressCoreError as error:
            problems.append(str(error))
    return removed, problems


def cleanup_node(config: AgentConfig, log: EventLog) -> list[str]:
    """Remove everything the node role left on this host; returns what was removed."""
    redirect = config.redirect
    path = config.state_dir / OWNED_FILE
    record = read_record(path, log)
    settings = {
        "rule_priority": record.get("rule_priority", redirect.rule_priority),
        "mark_mask": record.get("mark_mask", redirect.mark_mask),
        "route_table_base": record.get("route_table_base", redirect.route_table_base),
        "slot_count": record.get("slot_count", redirect.slot_count()),
        "device": record.get("device", config.tunnel.device if config.tunnel else None),
    }
    removed, problems = remove_node_state(config, settings)
    for problem in problems:
        log.error("remove_failed", error=problem)
    path.unlink(missing_ok=True)
    return removed
