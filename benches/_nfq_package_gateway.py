"""The benchmark's baseline gateway: the ``netfilterqueue`` package's per-packet callback.

Same rules and the same compiled classifier and Cython SNAT table as egresscore's
gateway; only the NFQUEUE binding differs. Each packet becomes a Python ``Packet``
object, its payload is copied into Python, translated, copied back with
``set_payload`` and answered with its own verdict; the package has no GSO option, so
the kernel segments super-packets and completes checksums before queueing.

Run inside the gateway's namespace:
``python benches/_nfq_package_gateway.py CONFIG`` (stops on SIGTERM, removing its rules).
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import sys
import time

from netfilterqueue import NetfilterQueue

from egresscore.agent import iptables, load_config
from egresscore.agent.gateway import plan_gateway
from egresscore.agent.iptables import GatewayRules, QueuePorts
from egresscore.agent.netlink import add_address, remove_address
from egresscore.core.snat_table import SnatTable, Verdict

PREROUTING = 0


def main(config_path: str) -> None:
    config = load_config(config_path)
    plan = plan_gateway(config)
    classifier = plan.compiler.classifier
    table = SnatTable([str(ip) for ip in plan.egress_ips], max_entries=config.gateway.max_entries)
    egress_ip = str(plan.egress_ips[0])
    queue_number = config.gateway.first_queue
    counts = {"packets": 0}

    def handle(packet: object) -> None:
        counts["packets"] += 1
        payload = bytearray(packet.get_payload())  # type: ignore[attr-defined]
        now = time.monotonic()
        if packet.hook == PREROUTING:  # type: ignore[attr-defined]
            verdict = table.translate_inbound(payload, now)
            if verdict == Verdict.NOT_OURS:
                packet.accept()  # type: ignore[attr-defined]
                return
        else:
            source = socket.inet_ntoa(bytes(payload[12:16]))
            destination = socket.inet_ntoa(bytes(payload[16:20]))
            if classifier.classify(source, destination).action.name != "SNAT":
                packet.drop()  # type: ignore[attr-defined]
                return
            verdict = table.translate_outbound(payload, egress_ip, now)
        if verdict == Verdict.TRANSLATED:
            packet.set_payload(bytes(payload))  # type: ignore[attr-defined]
            packet.accept()  # type: ignore[attr-defined]
        else:
            packet.drop()  # type: ignore[attr-defined]

    queue = NetfilterQueue()
    queue.bind(queue_number, handle, max_len=config.gateway.queue_length)
    interface = config.gateway.interface or ""
    added = [ip for ip in plan.egress_ips if interface and add_address(interface, ip)]
    rules = GatewayRules(
        plan.egress_ips, plan.destinations, (QueuePorts(queue_number, 1024, 65535),), config.gateway.mark
    )
    iptables.apply(rules)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    try:
        queue.run()
    except KeyboardInterrupt:
        pass
    finally:
        iptables.remove()
        for ip in added:
            remove_address(interface, ipaddress.ip_address(ip))
        queue.unbind()
        print(f"packets {counts['packets']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
