"""Bounded traffic generators, run inside a namespace; each prints one JSON result.

``python -m egresscore.netlab.load MODE ...``:

- ``http --url URL --count N --concurrency C [--expect TEXT]``: N GET requests; ok/failed
  counts and the first errors (with ``--expect``, an answer without TEXT is a failure:
  the reply reached the wrong client).
- ``connections --host H --port P --duration S --concurrency C``: as many TCP
  connections as it can open (each reads the server's one byte and closes) for S
  seconds, C at a time, with non-blocking sockets; count, failures and rate.
- ``udp --host H --port P --size B --count N [--rate PPS]``: N datagrams of B bytes,
  flat out or paced; what was sent and how long it took.
- ``udp-echo --host H --port P --count N [--size B]``: N requests, each waiting for its
  echo (the socket stays open meanwhile, so ICMP errors about it are delivered).
- ``stream --host H --port P --duration S [--chunk B] [--interval S]``: one TCP
  connection sending B bytes every interval for S seconds (a send that blocks for half a
  second is a stall, not an end); bytes sent and stalls.
- ``latency --host H --port P --count N [--protocol tcp|udp] [--pause S]``: N new flows
  one after the other, each its first packet's round trip: a TCP connect (SYN to
  SYN-ACK) or a UDP request to an echo server from a new socket; microseconds each, with
  the median and the 90th percentile.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import errno
import json
import selectors
import socket
import time
import urllib.request
from typing import Any

__all__ = ["main"]


def http(args: argparse.Namespace) -> dict[str, Any]:
    def get(_: int) -> str | None:
        try:
            with urllib.request.urlopen(args.url, timeout=args.timeout) as response:
                body = response.read()
                if response.status != 200:
                    return f"status {response.status}"
                if args.expect and args.expect.encode() not in body:
                    return f"answer without {args.expect!r}: {body[:80]!r}"
                return None
        except OSError as error:
            return str(error)

    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(get, range(args.count)))
    errors = [r for r in results if r is not None]
    return {"ok": len(results) - len(errors), "failed": len(errors), "errors": errors[:5]}


def connections(args: argparse.Namespace) -> dict[str, Any]:
    selector = selectors.DefaultSelector()
    started = time.monotonic()
    deadline = started + args.duration
    done = failures = 0
    in_flight = 0
    errors: list[str] = []

    def open_one() -> None:
        nonlocal in_flight, failures
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex((args.host, args.port))
        if code not in (0, errno.EINPROGRESS):
            failures += 1
            sock.close()
            return
        selector.register(sock, selectors.EVENT_READ, (time.monotonic(),))
        in_flight += 1

    def read_answers() -> None:
        # Each ready connection: its one-byte answer, or its error.
        nonlocal in_flight, done, failures
        for key, _events in selector.select(0.05):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            selector.unregister(sock)
            in_flight -= 1
            try:
                if sock.recv(1) == b"k":
                    done += 1
                else:
                    failures += 1
            except OSError as error:
                failures += 1
                if len(errors) < 5:
                    errors.append(str(error))
            sock.close()

    while time.monotonic() < deadline and (args.max == 0 or done + failures + in_flight < args.max):
        while in_flight < args.concurrency and (args.max == 0 or done + failures + in_flight < args.max):
            open_one()
        read_answers()
        now = time.monotonic()
        for key in list(selector.get_map().values()):
            if now - key.data[0] > args.timeout:
                selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
                in_flight -= 1
                failures += 1
    # Connections still open at the deadline get their answer or time out: none is abandoned.
    finish = time.monotonic() + args.timeout
    while in_flight and time.monotonic() < finish:
        read_answers()
    failures += in_flight
    elapsed = time.monotonic() - started
    return {
        "connections": done,
        "failures": failures,
        "seconds": elapsed,
        "rate": done / elapsed,
        "errors": errors,
    }


def udp(args: argparse.Namespace) -> dict[str, Any]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    payload = b"u" * args.size
    target = (args.host, args.port)
    sent = blocked = 0
    started = time.monotonic()
    interval = 1.0 / args.rate if args.rate else 0.0
    while sent + blocked < args.count:
        if interval:
            # Paced in bursts of 32: the schedule is kept, however slow a single send is.
            due = started + (sent + blocked) * interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        for _ in range(min(32, args.count - sent - blocked)):
            try:
                sock.sendto(payload, target)
                sent += 1
            except OSError:
                blocked += 1
    elapsed = time.monotonic() - started
    return {"sent": sent, "send_errors": blocked, "seconds": elapsed, "rate": sent / elapsed}


def udp_echo(args: argparse.Namespace) -> dict[str, Any]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(args.timeout)
    replies = 0
    for i in range(args.count):
        message = f"echo {i} ".encode().ljust(args.size, b".")
        sock.sendto(message, (args.host, args.port))
        try:
            data, _ = sock.recvfrom(2048)
            replies += data == message
        except TimeoutError:
            continue
    return {"sent": args.count, "replies": replies}


def stream(args: argparse.Namespace) -> dict[str, Any]:
    sent = stalls = 0
    chunk = b"s" * args.chunk
    with socket.create_connection((args.host, args.port), timeout=5) as sock:
        sock.settimeout(0.5)
        deadline = time.monotonic() + args.duration
        while time.monotonic() < deadline:
            try:
                sock.sendall(chunk)
                sent += len(chunk)
            except TimeoutError:
                stalls += 1
            except OSError:
                break
            time.sleep(args.interval)
    return {"sent": sent, "stalls": stalls}


def latency(args: argparse.Namespace) -> dict[str, Any]:
    samples: list[float] = []
    failures = 0
    for i in range(args.count):
        kind = socket.SOCK_STREAM if args.protocol == "tcp" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.settimeout(args.timeout)
            try:
                started = time.perf_counter()
                if args.protocol == "tcp":
                    sock.connect((args.host, args.port))
                else:
                    request = f"latency {i}".encode()
                    sock.sendto(request, (args.host, args.port))
                    if sock.recvfrom(2048)[0] != request:
                        raise OSError("an answer that is not this request's echo")
                samples.append((time.perf_counter() - started) * 1e6)
            except OSError:
                failures += 1
        if args.pause:
            time.sleep(args.pause)
    ordered = sorted(samples)
    return {
        "count": len(samples),
        "failures": failures,
        "median_us": ordered[len(ordered) // 2] if ordered else None,
        "p90_us": ordered[int(len(ordered) * 0.9)] if ordered else None,
        "samples_us": [round(v, 1) for v in samples],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m egresscore.netlab.load")
    sub = parser.add_subparsers(dest="mode", required=True)

    def addressed(mode: str) -> argparse.ArgumentParser:
        # A mode that talks to one server: its address and port.
        mode_parser = sub.add_parser(mode)
        mode_parser.add_argument("--host", required=True)
        mode_parser.add_argument("--port", type=int, required=True)
        return mode_parser

    p = sub.add_parser("http")
    p.add_argument("--url", required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--expect", default="")
    p = addressed("connections")
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3.0)
    p = addressed("udp")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--count", type=int, default=100000)
    p.add_argument("--rate", type=float, default=0.0)
    p = addressed("udp-echo")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--size", type=int, default=0)
    p.add_argument("--timeout", type=float, default=2.0)
    p = addressed("stream")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--interval", type=float, default=0.05)
    p = addressed("latency")
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--protocol", choices=("tcp", "udp"), default="tcp")
    p.add_argument("--pause", type=float, default=0.002)
    p.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    handlers = {
        "http": http,
        "connections": connections,
        "udp": udp,
        "udp-echo": udp_echo,
        "latency": latency,
        "stream": stream,
    }
    print(json.dumps(handlers[args.mode](args)), flush=True)


if __name__ == "__main__":
    main()
