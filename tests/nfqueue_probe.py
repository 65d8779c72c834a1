"""Run inside a lab namespace by tests/test_nfqueue_network.py: binds one queue with
egresscore's NfQueue and answers packets in the way the test asks, printing one JSON
line per packet. Exits after --count packets or --seconds seconds."""

from __future__ import annotations

import argparse
import json
import sys
import time

from egresscore.core.nfqueue import ACCEPT, DROP, NfQueue
from egresscore.errors import KernelError


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument(
        "--mode", choices=("accept-mark", "drop", "rewrite", "leave", "busy", "late"), required=True
    )
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    # "late": a small socket buffer and a worker that starts reading only after a burst,
    # so that the kernel cannot deliver everything (ENOBUFS), then accepts all it gets.
    late = args.mode == "late"
    queue = NfQueue(args.queue, batch_size=8, timeout=0.1, receive_buffer=65536 if late else 16 * 1024 * 1024,
                    max_length=100000 if late else 4096)  # fmt: skip
    if args.mode == "busy":
        try:
            NfQueue(args.queue)
        except KernelError as error:
            print(json.dumps({"errno": error.errno, "message": str(error)}), flush=True)
        queue.close()
        return
    print("ready", flush=True)
    if late:
        time.sleep(2)
    seen = 0
    deadline = time.monotonic() + args.seconds
    while seen < args.count and time.monotonic() < deadline:
        for packet in queue.receive():
            seen += 1
            print(
                json.dumps({"id": packet.id, "hook": packet.hook, "length": len(packet.payload)}), flush=True
            )
            if args.mode in ("accept-mark", "late"):
                queue.verdict(packet, ACCEPT, mark=0x42)
            elif args.mode == "drop":
                queue.verdict(packet, DROP)
            elif args.mode == "rewrite":
                payload = packet.payload
                header = (payload[0] & 0x0F) * 4
                payload[header + 6 : header + 8] = b"\0\0"  # UDP over IPv4: no checksum (RFC 768)
                payload[header + 8 :] = payload[header + 8 :].upper()
                queue.verdict(packet, ACCEPT, payload=payload)
            # "leave": no verdict; the next receive (or close) answers DROP for it.
    counters = queue.counters()
    queue.close()
    print(json.dumps({"counters": counters}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
