"""Servers for the external host that record the peer address they see.

``python -m egresscore.netlab.peers KIND --bind ADDR --port N --record FILE
[--duration S]``: runs until SIGTERM or ``--duration`` seconds (bounded), and writes
one JSON line per connection, datagram or echo request to ``FILE``, flushed at once.
Kinds: ``http`` (GET / answers with the peer address; GET /bytes?n=N answers N bytes),
``udp-echo``, ``udp-sink`` (counts datagrams per peer, records the totals at exit),
``tcp-sink`` (accepts and closes connections, counts them per peer), ``tcp-stream``
(reads what each connection sends and records its bytes every second, with the
seconds since the server started), and ``icmp`` (records the source of every ICMP echo
request; the kernel answers it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import signal
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any
from urllib.parse import parse_qs, urlparse

__all__ = ["read_records"]


def read_records(path: str) -> list[dict[str, Any]]:
    """The records a server wrote (an unfinished last line is skipped)."""
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    except FileNotFoundError:
        return []
    return records


class _Recorder:
    def __init__(self, handle: IO[str], kind: str) -> None:
        self.handle = handle
        self.kind = kind
        self.lock = threading.Lock()

    def write(self, **fields: Any) -> None:
        with self.lock:
            self.handle.write(json.dumps({"kind": self.kind, "time": time.time(), **fields}) + "\n")
            self.handle.flush()


def _serve_http(args: argparse.Namespace, record: _Recorder, stop: threading.Event) -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            peer, port = self.client_address[:2]
            local = self.connection.getsockname()[0]
            record.write(peer=peer, peer_port=port, local=local, path=self.path)
            url = urlparse(self.path)
            if url.path == "/bytes":
                size = int(parse_qs(url.query).get("n", ["0"])[0])
                body = b"x" * size
            else:
                body = f"you are {peer}, asking {self.path}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((args.bind, args.port), Handler)
    server.daemon_threads = True
    server.timeout = 0.2
    print("ready", flush=True)
    while not stop.is_set():
        server.handle_request()
    server.server_close()


def _serve_udp(args: argparse.Namespace, record: _Recorder, stop: threading.Event, echo: bool) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.bind((args.bind, args.port))
    sock.settimeout(0.2)
    counts: Counter[str] = Counter()
    print("ready", flush=True)
    while not stop.is_set():
        try:
            data, (peer, port) = sock.recvfrom(65535)
        except TimeoutError:
            continue
        if echo:
            record.write(peer=peer, peer_port=port, size=len(data), head=data[:32].decode("latin-1"))
            sock.sendto(data, (peer, port))
        else:
            counts[peer] += 1
    for peer, count in counts.items():
        record.write(peer=peer, datagrams=count)
    sock.close()


def _tcp_listener(args: argparse.Namespace, backlog: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.bind, args.port))
    listener.listen(backlog)
    listener.setblocking(False)
    return listener


def _serve_tcp_sink(args: argparse.Namespace, record: _Recorder, stop: threading.Event) -> None:
    listener = _tcp_listener(args, 4096)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    counts: Counter[str] = Counter()
    print("ready", flush=True)
    while not stop.is_set():
        for _key, _events in selector.select(0.2):
            while True:
                try:
                    connection, (peer, _port) = listener.accept()
                except BlockingIOError:
                    break
                counts[peer] += 1
                # A one-byte answer then close: the client reads it, so every connection
                # is a full round trip through the gateway.
                with contextlib.suppress(OSError):
                    connection.send(b"k")
                connection.close()
    for peer, count in counts.items():
        record.write(peer=peer, connections=count)
    listener.close()


def _serve_tcp_stream(args: argparse.Namespace, record: _Recorder, stop: threading.Event) -> None:
    listener = _tcp_listener(args, 64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    started = time.monotonic()
    received: dict[socket.socket, int] = {}
    peers: dict[socket.socket, str] = {}
    second = 0
    print("ready", flush=True)

    def flush(now_second: int) -> None:
        for connection, count in received.items():
            record.write(peer=peers[connection], second=now_second, bytes=count)
            received[connection] = 0

    while not stop.is_set():
        for key, _events in selector.select(0.1):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    connection, (peer, _port) = listener.accept()
                    connection.setblocking(False)
                    selector.register(connection, selectors.EVENT_READ, peer)
                    received[connection], peers[connection] = 0, peer
                continue
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            connection = ready
            try:
                data = connection.recv(65536)
            except OSError:
                data = b""
            if data:
                received[connection] += len(data)
            else:
                selector.unregister(connection)
                record.write(
                    peer=peers[connection],
                    second=int(time.monotonic() - started),
                    bytes=received.pop(connection),
                )
                peers.pop(connection)
                connection.close()
        now_second = int(time.monotonic() - started)
        if now_second != second:
            flush(second)
            second = now_second
    flush(second)
    listener.close()


def _serve_icmp(args: argparse.Namespace, record: _Recorder, stop: threading.Event) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(0.2)
    print("ready", flush=True)
    while not stop.is_set():
        try:
            data, (peer, _port) = sock.recvfrom(65535)
        except TimeoutError:
            continue
        header = (data[0] & 0x0F) * 4
        if len(data) > header + 7 and data[header] == 8:  # ICMP echo request (RFC 792)
            identifier = int.from_bytes(data[header + 4 : header + 6], "big")
            record.write(peer=peer, identifier=identifier, size=len(data))
    sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m egresscore.netlab.peers")
    parser.add_argument("kind", choices=("http", "udp-echo", "udp-sink", "tcp-sink", "tcp-stream", "icmp"))
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--record", required=True)
    parser.add_argument("--duration", type=float, default=300.0)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    timer = threading.Timer(args.duration, stop.set)
    timer.daemon = True
    timer.start()
    with open(args.record, "a", encoding="utf-8") as handle:
        record = _Recorder(handle, args.kind)
        if args.kind == "http":
            _serve_http(args, record, stop)
        elif args.kind in ("udp-echo", "udp-sink"):
            _serve_udp(args, record, stop, echo=args.kind == "udp-echo")
        elif args.kind == "tcp-sink":
            _serve_tcp_sink(args, record, stop)
        elif args.kind == "tcp-stream":
            _serve_tcp_stream(args, record, stop)
        else:
            _serve_icmp(args, record, stop)
    sys.exit(0)


if __name__ == "__main__":
    main()
