"""Namespaces, veth links, addresses, routes and processes of a lab network."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["GatewayTopology", "Lab", "LabError", "checksum_errors", "nstat"]

_COUNTER = itertools.count()


class LabError(RuntimeError):
    """A command that builds the lab failed (the message has the command and its stderr)."""


class Lab:
    """Namespaces and processes owned by one test or benchmark run.

    ``Lab(prefix=None)``; use as a context manager, or call :meth:`close` in a
    ``finally``. Every command runs inside a namespace of this lab through
    ``ip netns exec`` with an argument list (never a shell string).
    """

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"egc{os.getpid()}x{next(_COUNTER)}-"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[Any]] = []
        self.workdir = Path(tempfile.mkdtemp(prefix=self.prefix))

    # -- commands ---------------------------------------------------------------------

    def run(
        self, ns: str, *argv: str, check: bool = True, timeout: float = 30, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = ["ip", "netns", "exec", self._own(ns), *argv]
        try:
            result = subprocess.run(
                command, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as error:
            raise LabError(f"{' '.join(command)}: no answer within {timeout} s") from error
        if check and result.returncode != 0:
            raise LabError(f"{' '.join(command)}: exit code {result.returncode}: {result.stderr.strip()}")
        return result

    def _own(self, ns: str) -> str:
        if ns not in self.namespaces:
            raise LabError(f"namespace {ns!r} was not created by this lab ({self.prefix})")
        return ns

    def namespace(self, role: str) -> str:
        """Create the namespace ``prefix + role`` with its loopback up; returns its name."""
        name = self.prefix + role
        result = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise LabError(f"ip netns add {name}: {result.stderr.strip()}")
        self.namespaces.append(name)
        self.run(name, "ip", "link", "set", "lo", "up")
        return name

    def veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str, *, mtu: int | None = None) -> None:
        """A veth pair with one end in each namespace, both up."""
        self.run(
            ns_a,
            "ip",
            "link",
            "add",
            name_a,
            "type",
            "veth",
            "peer",
            "name",
            name_b,
            "netns",
            self._own(ns_b),
        )
        for ns, name in ((ns_a, name_a), (ns_b, name_b)):
            if mtu is not None:
                self.run(ns, "ip", "link", "set", name, "mtu", str(mtu))
            self.run(ns, "ip", "link", "set", name, "up")

    def address(self, ns: str, interface: str, cidr: str) -> None:
        self.run(ns, "ip", "address", "add", cidr, "dev", interface)

    def route(self, ns: str, destination: str, via: str) -> None:
        self.run(ns, "ip", "route", "add", destination, "via", via)

    def sysctl(self, ns: str, key: str, value: str) -> None:
        self.run(ns, "sysctl", "-qw", f"{key}={value}")

    def offloads(self, ns: str, interface: str, enabled: bool) -> None:
        """Checksum offload, TSO, GSO and GRO of ``interface`` on or off together."""
        state = "on" if enabled else "off"
        self.run(
            ns, "ethtool", "-K", interface, "tx", state, "rx", state, "tso", state, "gso", state, "gro", state
        )

    # -- processes --------------------------------------------------------------------

    def spawn(
        self, ns: str, argv: Sequence[str], *, log: str | None = None, **options: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``ns``; :meth:`close` stops it if it still runs. With
        ``log``, standard output and error go to that file in the lab's directory."""
        output: IO[Any] | int = subprocess.DEVNULL
        if log is not None:
            output = open(self.workdir / log, "ab")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            ["ip", "netns", "exec", self._own(ns), *argv],
            stdout=options.pop("stdout", output),
            stderr=options.pop("stderr", output),
            stdin=options.pop("stdin", subprocess.DEVNULL),
            **options,
        )
        if log is not None and not isinstance(output, int):
            output.close()
        self.processes.append(process)
        return process

    def python(self, ns: str, module: str, *args: str, **options: Any) -> subprocess.Popen[Any]:
        """Start ``python -m module args`` inside ``ns`` with this interpreter."""
        return self.spawn(ns, [sys.executable, "-m", module, *args], **options)

    def peer(
        self, ns: str, kind: str, *, bind: str, port: int, record: str | Path, duration: float = 120
    ) -> subprocess.Popen[bytes]:
        """Start a recording server of :mod:`egresscore.netlab.peers` (``kind``) in ``ns``,
        bounded by ``duration`` seconds, once it listens; it records to ``record``."""
        process = self.python(
            ns, "egresscore.netlab.peers", kind, "--bind", bind, "--port", str(port), "--record", str(record),
            "--duration", str(duration), stdout=subprocess.PIPE,
        )  # fmt: skip
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            self.stop(process)
            raise LabError(f"the {kind} server in {ns} did not start on {bind} port {port}")
        return process

    def stop(self, process: subprocess.Popen[Any], timeout: float = 10) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        return process.returncode

    def close(self) -> list[str]:
        """Stop every process, delete every namespace; returns the problems met (cleanup
        never raises, so that it always finishes)."""
        problems: list[str] = []
        for process in reversed(self.processes):
            try:
                self.stop(process, timeout=5)
            except (OSError, subprocess.SubprocessError) as error:
                problems.append(f"process {process.pid}: {error}")
        self.processes.clear()
        for name in reversed(self.namespaces):
            # A process that outlived its parent keeps a namespace's network alive; kill
            # whatever still runs in it before deleting it.
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False)
            for pid in pids.stdout.split():
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            result = subprocess.run(
                ["ip", "netns", "delete", name], capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                problems.append(f"ip netns delete {name}: {result.stderr.strip()}")
        self.namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return problems

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def nstat(lab: Lab, ns: str) -> dict[str, int]:
    """The namespace's SNMP counters (``nstat -asz``: absolute values; the history file is
    neither read nor written)."""
    result = lab.run(ns, "nstat", "--ignore", "--noupdate", "--zeros")
    counters = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            counters[parts[0]] = int(parts[1])
    return counters


def checksum_errors(lab: Lab, ns: str) -> dict[str, int]:
    """Every ``*CsumErrors`` counter of the namespace (TCP, UDP, ICMP, both families)."""
    return {name: value for name, value in nstat(lab, ns).items() if name.endswith("CsumErrors")}


class GatewayTopology:
    """client — gateway — router — external, the network of the gateway tests.

    ::

        client "cl"  c0 198.18.1.2/24, default via 198.18.1.1           (a pod)
        gateway "gw" g0 198.18.1.1/24 | g1 198.18.2.1/24               (egress IPs go on g1)
                     203.0.113.0/24 and 198.51.100.0/24 via 198.18.2.2; forwarding
        router "rt"  r0 198.18.2.2/24 | r1 203.0.113.1/24 (mtu: uplink_mtu or router_mtu)
                     192.0.2.0/24 via 198.18.2.1; forwarding; no route to the pods
        external "ex" e0 203.0.113.10/24, 192.0.2.0/24 and 198.18.2.0/24 via 203.0.113.1

    The router knows no route to 198.18.1.0/24, as the Internet knows none to a
    cluster's pods: a packet that leaves untranslated gets no answer.

    With ``node_masquerade`` (the default) the gateway masquerades the pods' traffic
    leaving g1 to its own address, 198.18.2.1, as a CNI does on a Kubernetes node: a
    policy flow that slipped past egresscore would show up at the external host with
    the node's address.
    """

    CLIENT_IP = "198.18.1.2"
    GATEWAY_POD_SIDE_IP = "198.18.1.1"
    GATEWAY_UPLINK_IP = "198.18.2.1"
    ROUTER_IP = "198.18.2.2"
    EXTERNAL_IP = "203.0.113.10"
    EGRESS_IP = "192.0.2.10"

    def __init__(
        self,
        lab: Lab,
        *,
        uplink_mtu: int | None = None,
        router_mtu: int | None = None,
        offloads: bool = True,
        node_masquerade: bool = True,
    ) -> None:
        self.lab = lab
        self.client = lab.namespace("cl")
        self.gateway = lab.namespace("gw")
        self.router = lab.namespace("rt")
        self.external = lab.namespace("ex")
        lab.veth(self.client, "c0", self.gateway, "g0")
        lab.veth(self.gateway, "g1", self.router, "r0")
        lab.veth(self.router, "r1", self.external, "e0", mtu=uplink_mtu)

        lab.address(self.client, "c0", "198.18.1.2/24")
        lab.route(self.client, "default", "198.18.1.1")
        lab.address(self.gateway, "g0", "198.18.1.1/24")
        lab.address(self.gateway, "g1", "198.18.2.1/24")
        lab.route(self.gateway, "203.0.113.0/24", "198.18.2.2")
        lab.route(self.gateway, "198.51.100.0/24", "198.18.2.2")
        lab.address(self.router, "r0", "198.18.2.2/24")
        lab.address(self.router, "r1", "203.0.113.1/24")
        lab.route(self.router, "192.0.2.0/24", "198.18.2.1")
        lab.address(self.external, "e0", "203.0.113.10/24")
        lab.route(self.external, "192.0.2.0/24", "203.0.113.1")
        # The nodes' own addresses are reachable, as on a real network: a packet that
        # leaves with the node's address gets its answer, and the server records it.
        lab.route(self.external, "198.18.2.0/24", "203.0.113.1")
        if router_mtu is not None:
            # Only the router's side is narrow. The external host keeps announcing a
            # 1460-byte MSS, so a TCP sender toward it must learn the path MTU from the
            # router's ICMP errors; its own packets toward the cluster are kept within
            # the narrow link by its route (a veth drops larger frames without a word).
            lab.run(self.router, "ip", "link", "set", "r1", "mtu", str(router_mtu))
            lab.run(
                self.external, "ip", "route", "replace", "192.0.2.0/24", "via", "203.0.113.1",
                "mtu", str(router_mtu), "advmss", "1460",
            )  # fmt: skip
        for ns in (self.gateway, self.router):
            lab.sysctl(ns, "net.ipv4.ip_forward", "1")
        if node_masquerade:
            lab.run(
                self.gateway, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "198.18.1.0/24", "-o", "g1",
                "-j", "MASQUERADE",
            )  # fmt: skip
        if not offloads:
            for ns, interface in (
                (self.client, "c0"),
                (self.gateway, "g0"),
                (self.gateway, "g1"),
                (self.router, "r0"),
                (self.router, "r1"),
                (self.external, "e0"),
            ):
                lab.offloads(ns, interface, False)

    def kernel_snat(self, egress_ip: str = EGRESS_IP) -> None:
        """Make the gateway the kernel-only peer: the egress IP on g1 and an iptables SNAT
        rule (ahead of the node's masquerade)."""
        self.lab.address(self.gateway, "g1", f"{egress_ip}/32")
        self.lab.run(
            self.gateway, "iptables", "-t", "nat", "-I", "POSTROUTING", "1", "-s", "198.18.1.0/24",
            "-o", "g1", "-j", "SNAT", "--to-source", egress_ip,
        )  # fmt: skip

    def remove_kernel_snat(self, egress_ip: str = EGRESS_IP) -> None:
        self.lab.run(
            self.gateway, "iptables", "-t", "nat", "-D", "POSTROUTING", "-s", "198.18.1.0/24", "-o", "g1",
            "-j", "SNAT", "--to-source", egress_ip,
        )  # fmt: skip
        self.lab.run(self.gateway, "ip", "address", "del", f"{egress_ip}/32", "dev", "g1")
