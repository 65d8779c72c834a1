"""The agent's iptables rules: computed, applied atomically, found and removed.

Everything egresscore installs lives in chains named ``EGRESSCORE-GW-*`` (the gateway
role) or ``EGRESSCORE-NODE-*`` (the node role) plus one jump rule per built-in chain,
tagged with the comment ``egresscore``. ``apply`` writes a role's whole set in one
``iptables-restore --noflush`` transaction (a chain declared in the input is emptied
and refilled, so applying twice gives the same rules, and a changed set replaces the
old one with no moment in between); ``remove`` deletes a role's jumps and chains, and
nothing else. Commands are run with argument lists and the rules reach
iptables-restore on its standard input: no shell.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from egresscore.errors import KernelError

__all__ = [
    "CHAIN_PREFIX",
    "NODE_PREFIX",
    "GatewayRules",
    "NodeRules",
    "apply",
    "apply_node",
    "find_owned",
    "remove",
    "remove_node",
    "render",
    "render_node",
]

CHAIN_PREFIX = "EGRESSCORE-GW-"
NODE_PREFIX = "EGRESSCORE-NODE-"
COMMENT = "egresscore"
# ICMP error types whose quote carries the original packet's ports (RFC 792):
# destination unreachable (fragmentation needed among them), time exceeded, parameter problem.
ICMP_ERROR_TYPES = (3, 11, 12)


@dataclass(frozen=True, slots=True)
class QueuePorts:
    """A worker's queue and the egress ports (and ICMP identifiers) it allocates."""

    queue: int
    low: int
    high: int


@dataclass(frozen=True, slots=True)
class GatewayRules:
    """What the gateway's rules say, before they are written as iptables rules."""

    egress_ips: tuple[ipaddress.IPv4Address, ...]
    destinations: tuple[ipaddress.IPv4Network, ...]
    queues: tuple[QueuePorts, ...]
    mark: int
    ingress_interfaces: tuple[str, ...] = ()
    tcp_in_kernel: bool = False
    # failure_mode open: with no worker listening the kernel accepts packets untranslated.
    bypass: bool = False
    # The tunnel: what arrives on it for no destination of this gateway is dropped.
    tunnel_interfaces: tuple[str, ...] = ()
    # Role both: the node role's mark mask, pass value and redirect flag (0: no node role).
    node_marks: tuple[int, int, int] = (0, 0, 0)

    def marks(self) -> tuple[int, int, int]:
        """The three mark bits: queued to a worker after routing; a TCP packet to a
        policy destination; a connection the policy passes (saved as its connmark)."""
        return self.mark, self.mark << 1, self.mark << 2


def _queue_target(rules: GatewayRules) -> str:
    first, last = rules.queues[0].queue, rules.queues[-1].queue
    # No --queue-bypass (unless failure_mode is open): with no worker listening a policy
    # packet is dropped, never sent on untranslated.
    target = f"NFQUEUE --queue-num {first}" if first == last else f"NFQUEUE --queue-balance {first}:{last}"
    return target + (" --queue-bypass" if rules.bypass else "")


def render(rules: GatewayRules) -> dict[str, list[str]]:
    """The iptables-restore lines of each table (without ``*table`` and ``COMMIT``)."""
    pre, reply, select, tcp = (CHAIN_PREFIX + name for name in ("PRE", "REPLY", "SELECT", "TCP"))
    post = CHAIN_PREFIX + "POST"
    bits = rules.marks()
    queued, tcp_selected, passed = (f"0x{bit:x}/0x{bit:x}" for bit in bits)
    kernel = rules.tcp_in_kernel
    raw = [f":{pre} - [0:0]", f":{reply} - [0:0]", f":{select} - [0:0]"]
    if kernel:
        raw.append(f":{tcp} - [0:0]")
    # The entry chain holds one rule per egress IP and per policy destination, so that a
    # packet of neither kind costs a few address compares and nothing more.
    interfaces: Sequence[str | None] = rules.ingress_interfaces or (None,)
    for ip in rules.egress_ips:
        raw.append(f"-A {pre} -d {ip}/32 -g {reply}")
    for network in rules.destinations:
        for interface in interfaces:
            match = f"-i {interface} " if interface else ""
            raw.append(f"-A {pre} {match}-d {network} -g {select}")
    # A packet a node redirected here whose destination no policy of this gateway covers
    # (the node's policies are not the gateway's, for a moment or for good), and that is
    # no flow the kernel translates already (a TCP flow whose policy went away): it could
    # only leave untranslated, so it is dropped, after routing, once conntrack has seen it.
    forward = CHAIN_PREFIX + "FWD"
    guard = [f":{forward} - [0:0]"]
    selected = f"0x0/0x{bits[0] | bits[1]:x}"
    # The workers' conntrack entries carry the first mark bit as their connmark.
    ours = f"0x0/0x{bits[0]:x}"
    for interface in rules.tunnel_interfaces:
        guard.append(
            f"-A {forward} -i {interface} -m mark --mark {selected} -m connmark --mark {ours} -j DROP"
        )
    if not rules.queues:
        # No egress IP, no worker: the tunnel's guard is all there is.
        return {"mangle": guard} if rules.tunnel_interfaces else {}
    # Replies to an egress IP: kept out of the kernel's conntrack (the SNAT table is the
    # state of record; a conntrack entry created from a reply would only be in the way)
    # and sent to the worker whose port range holds the destination port. With TCP in
    # the kernel, TCP replies are left to the conntrack entries the workers created.
    if kernel:
        raw.append(f"-A {reply} -p tcp -j RETURN")
        # An ICMP error quoting a TCP packet belongs to a kernel-translated flow too: its
        # conntrack entry translates it (outer destination and quoted source) as RELATED.
        # u32: the quoted protocol is at ICMP offset 8 + 9.
        raw.append(f'-A {reply} -p icmp -m u32 --u32 "0>>22&0x3C@16>>16&0xFF=6" -j RETURN')
    raw.append(f"-A {reply} -j CT --notrack")
    reply_protocols = ("udp",) if kernel else ("tcp", "udp")
    single = len(rules.queues) == 1
    for q in rules.queues:
        span = f"{q.low}:{q.high}"
        target = f"NFQUEUE --queue-num {q.queue}" + (" --queue-bypass" if rules.bypass else "")
        if single:
            for protocol in reply_protocols:
                raw.append(f"-A {reply} -p {protocol} -j {target}")
            raw.append(f"-A {reply} -p icmp --icmp-type echo-reply -j {target}")
            for icmp_type in ICMP_ERROR_TYPES:
                raw.append(f"-A {reply} -p icmp --icmp-type {icmp_type} -j {target}")
            continue
        for protocol in reply_protocols:
            raw.append(f"-A {reply} -p {protocol} --dport {span} -j {target}")
        # u32 offsets (RFC 792): "0>>22&0x3C@" skips the IPv4 header to the ICMP header.
        # An echo reply's identifier (the "port" of an ICMP flow) is its 16 bits at
        # offset 4. An error quotes our packet from offset 8: its protocol is at 8 + 9,
        # and after the quoted header ("8>>22&0x3C@") the quoted source port is at 8,
        # a quoted echo request's identifier at 8 + 4.
        raw.append(
            f'-A {reply} -p icmp --icmp-type echo-reply -m u32 --u32 "0>>22&0x3C@4>>16={span}" -j {target}'
        )
        quotes = (("17", 8), ("1", 12)) if kernel else (("6:17", 8), ("1", 12))
        for icmp_type in ICMP_ERROR_TYPES:
            for quoted, offset in quotes:
                test = f"0>>22&0x3C@16>>16&0xFF={quoted} && 0>>22&0x3C@8>>22&0x3C@{offset}>>16={span}"
                raw.append(f'-A {reply} -p icmp --icmp-type {icmp_type} -m u32 --u32 "{test}" -j {target}')
    # Pods' packets to policy destinations, in raw PREROUTING (before conntrack).
    if kernel:
        # TCP: every packet is marked for the fail-closed rule below; the first packet
        # of a flow goes to a worker, which creates the flow's conntrack entry with its
        # source NAT; the kernel translates everything after it.
        raw.append(f"-A {select} -p tcp -g {tcp}")
        raw.append(f"-A {tcp} -j MARK --set-xmark {tcp_selected}")
        raw.append(f"-A {tcp} -p tcp ! --syn -j RETURN")
        raw.append(f"-A {tcp} -m addrtype --dst-type LOCAL -j RETURN")
        for ip in rules.egress_ips:
            raw.append(f"-A {tcp} -s {ip}/32 -j RETURN")
        raw.append(f"-A {tcp} -j {_queue_target(rules)}")
    # Everything else: untracked and marked here, queued after routing in mangle
    # POSTROUTING, where the worker classifies and rewrites the source (a source
    # rewritten to a local address before routing makes the kernel drop the packet as
    # spoofed).
    raw.append(f"-A {select} -m addrtype --dst-type LOCAL -j RETURN")
    for ip in rules.egress_ips:
        raw.append(f"-A {select} -s {ip}/32 -j RETURN")
    raw.append(f"-A {select} -j MARK --set-xmark {queued}")
    raw.append(f"-A {select} -j CT --notrack")
    # What the host sends itself is not a pod's (in role both the tunnel's outer packets
    # inherit the marks of the pods' packets they carry).
    mangle = [
        f":{post} - [0:0]",
        f"-A {post} -m addrtype --src-type LOCAL -j RETURN",
        f"-A {post} -m mark --mark {queued} -j {_queue_target(rules)}",
    ]
    if rules.tunnel_interfaces:
        mangle = guard + mangle
    tables = {"raw": raw, "mangle": mangle}
    if kernel:
        remember = CHAIN_PREFIX + "REMEMBER"
        nat = CHAIN_PREFIX + "NAT"
        # A first packet the policy passes comes back with the pass mark: kept on its
        # connection, so that its later packets are known to need no translation.
        mangle.insert(1, f":{remember} - [0:0]")
        mangle.append(
            f"-A {remember} -m mark --mark {passed} -j CONNMARK --save-mark --nfmask 0x{bits[2]:x} "
            f"--ctmask 0x{bits[2]:x}"
        )
        # Fail closed: a pod's TCP packet to a policy destination whose connection is
        # neither a worker's (the workers' entries carry the first mark bit as their
        # connmark; an entry conntrack made itself, NATed by the CNI's masquerade, does
        # not) nor passed by the policy is dropped, never sent on as it is: its entry
        # expired, the flow is older than the gateway, or the kernel refused the create.
        node_mask, node_pass, node_flag = rules.node_marks
        if node_mask:
            # Role both: a local pod's flow the policy passes or redirects goes by the node
            # role's decision (saved as its connmark in FORWARD): its pass value, or its
            # redirect flag. Otherwise only a worker's entry lets it through.
            guard_chain = CHAIN_PREFIX + "GUARD"
            mangle.insert(1, f":{guard_chain} - [0:0]")
            mangle.append(f"-A {post} -m mark --mark {tcp_selected} -g {guard_chain}")
            mangle.append(f"-A {guard_chain} -m connmark --mark {queued} -j RETURN")
            mangle.append(f"-A {guard_chain} -m connmark --mark 0x{node_pass:x}/0x{node_mask:x} -j RETURN")
            mangle.append(f"-A {guard_chain} -m connmark --mark 0x{node_flag:x}/0x{node_flag:x} -j RETURN")
            mangle.append(f"-A {guard_chain} -j DROP")
        else:
            neither = f"0x0/0x{bits[0] | bits[2]:x}"
            mangle.append(f"-A {post} -m mark --mark {tcp_selected} -m connmark --mark {neither} -j DROP")
        # The kernel's NAT hooks exist in a network namespace only while it has a nat
        # table chain; the entries the workers create need them. The chain holds nothing.
        tables["nat"] = [f":{nat} - [0:0]"]
    return tables


JUMPS = {
    "raw": [("PREROUTING", CHAIN_PREFIX + "PRE")],
    "mangle": [
        ("POSTROUTING", CHAIN_PREFIX + "POST"),
        # FORWARD, not PREROUTING: in role both the node role's queue in mangle PREROUTING
        # would end that chain's traversal for the packets it decides (an accept verdict
        # resumes at the next hook), and the pass bit would never be saved.
        ("FORWARD", CHAIN_PREFIX + "REMEMBER"),
        ("FORWARD", CHAIN_PREFIX + "FWD"),
    ],
    "nat": [("POSTROUTING", CHAIN_PREFIX + "NAT")],
}


@dataclass(frozen=True, slots=True)
class NodeRules:
    """What the node role's rules say: which pods' packets to which destinations are
    decided by a worker, and the mark bits that carry the decision."""

    pod_interfaces: tuple[str, ...]
    destinations: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    first_queue: int
    queue_count: int
    mark_mask: int
    redirect_flag: int
    # TCP MSS for redirected flows (IPv4; IPv6 is 20 less), None: no clamping.
    mss: int | None = None
    # failure_mode open: with no worker listening the kernel accepts the packet undecided.
    bypass: bool = False
    # Without a gateway role here: the tunnel, whose packets no one on this host translates.
    tunnel_interface: str | None = None


def render_node(rules: NodeRules, family: int = 4) -> dict[str, list[str]]:
    """The iptables-restore lines (ip6tables with ``family=6``) of the node role."""
    pre, pod, fwd, nat = (NODE_PREFIX + name for name in ("PRE", "POD", "FWD", "NAT"))
    mask = f"0x{rules.mark_mask:x}"
    flag = f"0x{rules.redirect_flag:x}/0x{rules.redirect_flag:x}"
    first, last = rules.first_queue, rules.first_queue + rules.queue_count - 1
    target = f"NFQUEUE --queue-num {first}" if first == last else f"NFQUEUE --queue-balance {first}:{last}"
    if rules.bypass:
        target += " --queue-bypass"
    mangle = [f":{pre} - [0:0]", f":{pod} - [0:0]", f":{fwd} - [0:0]"]
    for interface in rules.pod_interfaces:
        mangle.append(f"-A {pre} -i {interface} -g {pod}")
    # A flow's decision lives in its connmark: restored on every packet from a pod, so a
    # decided flow keeps its decision (and its gateway) whatever the policies say later.
    mangle.append(f"-A {pod} -j CONNMARK --restore-mark --nfmask {mask} --ctmask {mask}")
    mangle.append(f"-A {pod} -m mark ! --mark 0x0/{mask} -j RETURN")
    # Undecided flows to a policy destination: their packets go to a worker until one is
    # decided (a flow the worker drops stays undecided, so its next packet is asked again).
    for network in rules.destinations:
        if network.version == family:
            mangle.append(f"-A {pod} -d {network} -j {target}")
    if rules.tunnel_interface is not None:
        # A node that runs no gateway has nothing to do with a packet the tunnel brings (a
        # node whose policies take this host for a gateway): forwarded, it would leave
        # untranslated.
        mangle.append(f"-A {fwd} -i {rules.tunnel_interface} -j DROP")
    # The verdict's mark is saved on the connection here, in a hook after the queue's: an
    # accept verdict ends the traversal of the chain that queued the packet.
    mangle.append(
        f"-A {fwd} -m connmark --mark 0x0/{mask} -m mark ! --mark 0x0/{mask} "
        f"-j CONNMARK --save-mark --nfmask {mask} --ctmask {mask}"
    )
    if rules.mss is not None:
        # The tunnel costs 50 bytes (RFC 7348 over IPv4): both ends of a redirected TCP flow
        # are told a segment size that fits it, the pod by its SYN-ACK, the remote by the SYN.
        mss = rules.mss if family == 4 else rules.mss - 20
        mangle.append(
            f"-A {fwd} -p tcp --tcp-flags SYN,RST SYN -m connmark --mark {flag} -j TCPMSS --set-mss {mss}"
        )
    # Redirected flows keep the pod's address into the tunnel: the gateway translates it,
    # a masquerade rule of the CNI must not. ACCEPT ends the nat chain for the packet.
    nat_lines = [f":{nat} - [0:0]", f"-A {nat} -m mark --mark {flag} -j ACCEPT"]
    return {"mangle": mangle, "nat": nat_lines}


NODE_JUMPS = {
    "mangle": [("PREROUTING", NODE_PREFIX + "PRE"), ("FORWARD", NODE_PREFIX + "FWD")],
    "nat": [("POSTROUTING", NODE_PREFIX + "NAT")],
}


def _run(argv: list[str], text_in: str | None = None) -> str:
    try:
        result = subprocess.run(argv, input=text_in, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError as error:
        raise KernelError(2, f"{argv[0]} is not installed (Debian package iptables)") from error
    except subprocess.TimeoutExpired as error:
        raise KernelError(110, f"{' '.join(argv)} did not finish in 30 s") from error
    if result.returncode != 0:
        raise KernelError(
            1, f"{' '.join(argv)} failed with exit code {result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout


def _binary(family: int, tool: str) -> str:
    return tool if family == 4 else tool.replace("iptables", "ip6tables")


def find_owned(
    save_text: str | None = None, prefix: str = CHAIN_PREFIX, family: int = 4
) -> dict[str, tuple[list[str], list[str]]]:
    """Per table, the jump rules (as ``-A ...`` specs) and chains egresscore owns now
    under ``prefix``."""
    text = save_text if save_text is not None else _run([_binary(family, "iptables-save")])
    owned: dict[str, tuple[list[str], list[str]]] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":" + prefix):
            owned.setdefault(table, ([], []))[1].append(line[1:].split()[0])
        elif line.startswith("-A ") and f"-j {prefix}" in line and not line.split()[1].startswith(prefix):
            owned.setdefault(table, ([], []))[0].append(line)
    return owned


def _removal_lines(jumps: list[str], chains: list[str]) -> list[str]:
    lines = ["-D " + rule[3:] for rule in jumps]
    lines += [f"-F {chain}" for chain in chains]
    lines += [f"-X {chain}" for chain in chains]
    return lines


def _restore(tables: dict[str, list[str]], family: int = 4) -> None:
    text = "".join(
        f"*{table}\n" + "".join(line + "\n" for line in lines) + "COMMIT\n" for table, lines in tables.items()
    )
    if text:
        _run([_binary(family, "iptables-restore"), "--noflush", "--wait"], text)


def apply_tables(
    tables: dict[str, list[str]],
    jumps_by_table: dict[str, list[tuple[str, str]]],
    prefix: str,
    family: int = 4,
) -> None:
    """Install (or replace) one role's chains and their jumps in one transaction; the
    role's chains that ``tables`` no longer declares go in the same transaction."""
    owned = find_owned(prefix=prefix, family=family)
    tables = {table: list(lines) for table, lines in tables.items()}
    for table, lines in tables.items():
        declared = {line[1:].split()[0] for line in lines if line.startswith(":")}
        jumps, _chains = owned.get(table, ([], []))
        for builtin, chain in jumps_by_table.get(table, []):
            if chain not in declared:
                continue
            if not any(rule.split()[1] == builtin and rule.endswith(f"-j {chain}") for rule in jumps):
                lines.append(f'-I {builtin} 1 -m comment --comment "{COMMENT}" -j {chain}')
    # Chains of an older rule set that this one no longer has (a changed role) go too, and
    # jumps from a built-in chain this one does not jump from (an older version's).
    for table, (jumps, chains) in owned.items():
        wanted = {line[1:].split()[0] for line in tables.get(table, []) if line.startswith(":")}
        wanted_jumps = set(jumps_by_table.get(table, []))
        stale = [c for c in chains if c not in wanted]
        stale_jumps = [
            j
            for j in jumps
            if j.split("-j ")[-1].strip() in stale
            or (j.split()[1], j.split("-j ")[-1].strip()) not in wanted_jumps
        ]
        if stale or stale_jumps:
            tables.setdefault(table, []).extend(_removal_lines(stale_jumps, stale))
    _restore(tables, family)


def remove_prefix(prefix: str, family: int = 4) -> bool:
    """Delete every jump rule and chain under ``prefix``; returns whether there was any."""
    owned = find_owned(prefix=prefix, family=family)
    if not owned:
        return False
    _restore({table: _removal_lines(jumps, chains) for table, (jumps, chains) in owned.items()}, family)
    return True


def apply(rules: GatewayRules) -> None:
    """Install (or replace) the gateway's rules in one transaction."""
    apply_tables(render(rules), JUMPS, CHAIN_PREFIX)


def remove() -> bool:
    """Delete every gateway jump rule and chain; returns whether there was any."""
    return remove_prefix(CHAIN_PREFIX)


def apply_node(rules: NodeRules, family: int = 4) -> None:
    """Install (or replace) the node role's rules of one family in one transaction."""
    apply_tables(render_node(rules, family), NODE_JUMPS, NODE_PREFIX, family)


def remove_node(family: int = 4) -> bool:
    """Delete every node-role jump rule and chain of one family; whether there was any."""
    return remove_prefix(NODE_PREFIX, family)
