"""The agent: one process per host running the node role, the gateway role, or both.

``Agent(config, role, log)``: ``start()``, then ``run()`` until a signal, then
``stop()`` (safe after a failed start). The agent reads the policy files itself, so
that every role and every worker compiles exactly the same texts; it watches them
(``reload_interval``, and SIGHUP) and applies a new generation only when every file is
good: a bad file is logged with its location and the generation in force stays.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from egresscore.agent.config import AgentConfig, check_role
from egresscore.agent.gateway import GatewayRole, cleanup_gateway
from egresscore.agent.log import EventLog
from egresscore.agent.node import NodeRole, cleanup_node
from egresscore.agent.process import CLOSE_IN_WORKERS
from egresscore.errors import EgressCoreError, PolicyError, PolicyErrorGroup
from egresscore.policy.compiler import Compiler
from egresscore.policy.loader import load_texts

__all__ = ["Agent", "PolicyFiles", "cleanup"]

# One agent of each role per network namespace: the chains, queues, tables and links are
# the namespace's. An abstract socket's name is per namespace and goes away with its
# process, crashed or not.
LOCK_NAMES = {"gateway": b"\0egresscore-gateway", "node": b"\0egresscore-node"}
LOCK_WHAT = {"gateway": "gateway", "node": "node agent"}
ROLE_PARTS = {"node": ("node",), "gateway": ("gateway",), "both": ("gateway", "node")}


class PolicyFiles:
    """The policy and inventory files of an agent: read as texts, and watched."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = tuple(paths)

    def signature(self) -> tuple[object, ...]:
        """Changes when any file is replaced, rewritten or appears or goes (a
        Kubernetes ConfigMap update swaps a symlink: stat follows it)."""
        result: list[object] = []
        for path in self.paths:
            try:
                st = os.stat(path)
            except OSError as error:
                result.append(error.errno)
            else:
                result.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(result)

    def read(self) -> list[tuple[str, str]]:
        """``(name, text)`` of every file; raises :class:`PolicyErrorGroup` naming each
        file that cannot be read."""
        texts: list[tuple[str, str]] = []
        errors: list[PolicyError] = []
        for path in self.paths:
            try:
                texts.append((str(path), path.read_text(encoding="utf-8")))
            except OSError as error:
                errors.append(PolicyError(f"cannot read the file: {error.strerror}", source=str(path)))
            except UnicodeDecodeError as error:
                errors.append(
                    PolicyError(f"not UTF-8 text: {error.reason} at byte {error.start}", source=str(path))
                )
        if errors:
            raise PolicyErrorGroup(errors)
        return texts


def _error_list(error: PolicyError) -> list[str]:
    if isinstance(error, PolicyErrorGroup):
        return [str(e) for e in error.errors]
    return [str(error)]


class Locks:
    """The per-namespace locks of the roles an agent runs."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []

    def take(self, parts: Sequence[str]) -> None:
        for part in parts:
            lock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                lock.bind(LOCK_NAMES[part])
            except OSError:
                lock.close()
                self.release()
                name = LOCK_NAMES[part][1:].decode()
                raise EgressCoreError(
                    f"another egresscore {LOCK_WHAT[part]} is running in this network namespace "
                    f"(the abstract socket @{name} is taken)"
                ) from None
            self.sockets.append(lock)
            CLOSE_IN_WORKERS.append(lock)

    def release(self) -> None:
        for lock in self.sockets:
            lock.close()
            if lock in CLOSE_IN_WORKERS:
                CLOSE_IN_WORKERS.remove(lock)
        self.sockets.clear()


class Agent:
    """``egresscore run --role ROLE``: the roles' start, supervision, reloads and stop."""

    def __init__(self, config: AgentConfig, role: str, log: EventLog) -> None:
        check_role(config, role)
        self.config = config
        self.role = role
        self.log = log.bind(node=config.node)
        self.files = PolicyFiles(config.policies)
        parts = ROLE_PARTS[role]
        self.parts = parts
        self.gateway = GatewayRole(config, log, with_node="node" in parts) if "gateway" in parts else None
        self.node = NodeRole(config, log, with_gateway="gateway" in parts) if "node" in parts else None
        # The gateway starts first: in role both its rules must take the tunnel's packets
        # before the node's start sending local pods' flows anywhere.
        self.roles: list[GatewayRole | NodeRole] = [r for r in (self.gateway, self.node) if r is not None]
        self.locks = Locks()
        self.stop_requested = False
        self.reload_requested = False
        self.generation = 0
        self.compiler: Compiler | None = None
        self.texts: list[tuple[str, str]] = []
        self.signature: tuple[object, ...] = ()
        self.next_check = 0.0

    # -- start ------------------------------------------------------------------------

    def _compile(self) -> tuple[list[tuple[str, str]], Compiler, list[Any]]:
        texts = self.files.read()
        compiler = Compiler(load_texts(texts), self.config.node)
        plans = [role.prepare(compiler) for role in self.roles]
        return texts, compiler, plans

    def start(self) -> None:
        """Compile, check, then program the host. Raises (with nothing on the host
        changed) for bad policies, a bad host, or another agent running."""
        signature = self.files.signature()
        texts, compiler, plans = self._compile()
        for role in self.roles:
            role.check_host()
        self.locks.take(self.parts)
        self.texts, self.compiler, self.signature = texts, compiler, signature
        self.generation = 1
        for role, plan in zip(self.roles, plans, strict=True):
            role.start(compiler, plan)

    # -- run --------------------------------------------------------------------------

    def request_stop(self, signum: int = 0, frame: object = None) -> None:
        self.stop_requested = True

    def request_reload(self, signum: int = 0, frame: object = None) -> None:
        self.reload_requested = True

    def run(self) -> None:
        """Supervise the workers and follow the policy files until a stop is requested."""
        interval = self.config.reload_interval
        while not self.stop_requested:
            time.sleep(0.1)
            now = time.monotonic()
            if self.reload_requested or (interval > 0 and now >= self.next_check):
                forced, self.reload_requested = self.reload_requested, False
                self.next_check = now + interval
                if forced or self.files.signature() != self.signature:
                    self.reload()
            if self.stop_requested:
                break
            assert self.compiler is not None
            for role in self.roles:
                role.supervise(self.compiler)

    def reload(self) -> bool:
        """Read and compile the files; apply the result to every role only when all is
        well. Returns whether a new generation is in force."""
        started = time.monotonic()
        signature = self.files.signature()
        try:
            texts, compiler, plans = self._compile()
        except PolicyError as error:
            # Not retried until a file changes again; the generation in force stays.
            self.signature = signature
            self.log.error("reload_failed", generation=self.generation, errors=_error_list(error))
            return False
        if texts == self.texts:
            self.signature = signature
            return False
        generation = self.generation + 1
        problems: list[str] = []
        try:
            for role, plan in zip(self.roles, plans, strict=True):
                problems.extend(role.reload(compiler, plan, generation, texts))
        except (EgressCoreError, OSError, NetlinkError) as error:
            # The host refused a change (iptables, netlink): retried at the next check.
            self.log.error("reload_failed", generation=self.generation, errors=[str(error)])
            return False
        self.texts, self.compiler, self.signature, self.generation = texts, compiler, signature, generation
        self.log.info(
            "reloaded",
            generation=generation,
            policies=len(compiler.units),
            endpoints=len(compiler.inventory.endpoints),
            seconds=round(time.monotonic() - started, 3),
            problems=problems,
        )
        return True

    # -- stop -------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every role. With ``failure_mode: closed`` the host keeps the rules (a
        selected pod's new flows are dropped until an agent runs again); with ``open``
        everything is removed. Never raises."""
        keep = self.config.fail_closed
        for role in reversed(self.roles):
            try:
                role.stop(keep)
            except Exception as error:  # stop must go on to the next role
                self.log.error("stop_failed", role=role.name, error=f"{type(error).__name__}: {error}")
        self.locks.release()

    def status(self) -> dict[str, Any]:
        return {role.name: role.status() for role in self.roles}


def cleanup(config: AgentConfig, role: str, log: EventLog) -> list[str]:
    """Remove what the agent's roles left on this host (``egresscore cleanup``);
    refuses while any agent runs in this network namespace (a node and a gateway share
    the tunnel link). Returns what was removed."""
    parts = ROLE_PARTS[role]
    locks = Locks()
    locks.take(ROLE_PARTS["both"])
    try:
        removed = []
        if "node" in parts:
            removed.extend(cleanup_node(config, log))
        if "gateway" in parts:
            removed.extend(cleanup_gateway(config, log))
        return removed
    finally:
        locks.release()
