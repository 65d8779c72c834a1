"""NfQueue's Python API against the kernel, in namespaces: verdicts, marks, payload
replacement, the verdict given to packets left unanswered, and a busy queue."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from network_lab import require_network

from egresscore.netlab import Lab
from egresscore.netlab.peers import read_records

pytestmark = pytest.mark.network

PROBE = str(Path(__file__).parent / "nfqueue_probe.py")
SENDER, RECEIVER = "198.18.5.1", "198.18.5.2"


@pytest.fixture
def pair() -> Iterator[tuple[Lab, str, str]]:
    require_network()
    lab = Lab()
    try:
        a, b = lab.namespace("a"), lab.namespace("b")
        lab.veth(a, "a0", b, "b0")
        lab.address(a, "a0", f"{SENDER}/24")
        lab.address(b, "b0", f"{RECEIVER}/24")
        # Datagrams to port 9999 are queued in mangle OUTPUT; filter OUTPUT, a later table
        # of the same hook, counts the packets that come back from the queue with the mark.
        lab.run(a, "iptables", "-t", "mangle", "-A", "OUTPUT", "-p", "udp", "--dport", "9999",
                "-j", "NFQUEUE", "--queue-num", "3")  # fmt: skip
        lab.run(a, "iptables", "-t", "filter", "-A", "OUTPUT", "-m", "mark", "--mark", "0x42", "-j", "ACCEPT")
        yield lab, a, b
    finally:
        lab.close()


def start_probe(lab: Lab, ns: str, mode: str, count: int = 5) -> subprocess.Popen[bytes]:
    probe = lab.spawn(ns, [sys.executable, PROBE, "--queue", "3", "--mode", mode, "--count", str(count)],
                      stdout=subprocess.PIPE)  # fmt: skip
    assert probe.stdout is not None and probe.stdout.readline().strip() == b"ready"
    return probe


def sink(lab: Lab, ns: str) -> tuple[subprocess.Popen[bytes], str]:
    record = str(lab.workdir / "sink.jsonl")
    return lab.peer(ns, "udp-echo", bind=RECEIVER, port=9999, record=record, duration=30), record


def send(lab: Lab, ns: str, count: int) -> None:
    lab.run(ns, sys.executable, "-c",
            "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"for i in range({count}): s.sendto(b'hello %d' % i, ('{RECEIVER}', 9999))")  # fmt: skip


def finish(lab: Lab, probe: subprocess.Popen[bytes]) -> tuple[list[dict[str, int]], dict[str, int]]:
    out, _ = probe.communicate(timeout=20)
    lines = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    return lines[:-1], lines[-1]["counters"]


def test_accept_with_a_mark(pair: tuple[Lab, str, str]) -> None:
    lab, a, b = pair
    server, record = sink(lab, b)
    probe = start_probe(lab, a, "accept-mark")
    send(lab, a, 5)
    packets, counters = finish(lab, probe)
    assert len(packets) == 5 and {p["hook"] for p in packets} == {3}  # NF_INET_LOCAL_OUT
    assert counters["packets"] == 5 and counters["verdict_messages"] == 5
    time.sleep(0.3)
    lab.stop(server)
    assert len(read_records(record)) == 5
    # The mark the verdict set is on the packets the kernel went on with.
    counted = lab.run(a, "iptables", "-t", "filter", "-L", "OUTPUT", "-v", "-x", "-n").stdout
    marked = [line for line in counted.splitlines() if "0x42" in line]
    assert marked and int(marked[0].split()[0]) == 5


def test_drop_and_rewrite(pair: tuple[Lab, str, str]) -> None:
    lab, a, b = pair
    server, record = sink(lab, b)
    probe = start_probe(lab, a, "drop", count=3)
    send(lab, a, 3)
    finish(lab, probe)
    probe = start_probe(lab, a, "rewrite", count=3)
    send(lab, a, 3)
    _, counters = finish(lab, probe)
    assert counters["payload_verdicts"] == 3
    time.sleep(0.3)
    lab.stop(server)
    records = read_records(record)
    # The three dropped never arrived; the three rewritten arrived as the verdict wrote them.
    assert sorted(r["head"] for r in records) == ["HELLO 0", "HELLO 1", "HELLO 2"]


def test_packets_left_unanswered_are_dropped_once(pair: tuple[Lab, str, str]) -> None:
    lab, a, b = pair
    server, record = sink(lab, b)
    probe = start_probe(lab, a, "leave", count=4)
    send(lab, a, 4)
    packets, counters = finish(lab, probe)
    assert len(packets) == 4
    time.sleep(0.3)
    lab.stop(server)
    assert read_records(record) == []
    # One verdict each, and none refused by the kernel (no packet answered twice).
    assert counters["kernel_errors"] == 0


def test_enobufs_is_counted_and_survived(pair: tuple[Lab, str, str]) -> None:
    lab, a, b = pair
    server, record = sink(lab, b)
    probe = lab.spawn(a, [sys.executable, PROBE, "--queue", "3", "--mode", "late", "--count", "100000",
                          "--seconds", "6"], stdout=subprocess.PIPE)  # fmt: skip
    assert probe.stdout is not None and probe.stdout.readline().strip() == b"ready"
    # A burst larger than the 64 KiB socket buffer while the probe is not reading.
    send(lab, a, 3000)
    time.sleep(2.5)
    # After the overflow the queue goes on: these arrive and are answered.
    send(lab, a, 20)
    packets, counters = finish(lab, probe)
    time.sleep(0.3)
    lab.stop(server)
    assert counters["enobufs"] >= 1
    assert counters["lost"] > 0
    # Every packet it did receive got its verdict and went on; the lost ones the kernel
    # dropped itself (no fail-open), so the receiver saw exactly what the probe accepted.
    assert len(packets) == counters["packets"]
    assert len(read_records(record)) == counters["packets"]
    assert counters["packets"] + counters["lost"] == 3020
    assert counters["kernel_errors"] == 0


def test_a_bound_queue_is_busy_for_a_second_socket(pair: tuple[Lab, str, str]) -> None:
    lab, a, _ = pair
    result = lab.run(a, sys.executable, PROBE, "--queue", "3", "--mode", "busy")
    answer = json.loads(result.stdout)
    # The kernel answers EPERM when another socket holds the queue.
    assert answer["errno"] == 1
    assert "another socket holds this queue" in answer["message"]


def test_bad_arguments_are_refused_before_any_socket() -> None:
    from egresscore.core.nfqueue import NfQueue

    for kwargs, message in [
        ({"number": 70000}, "expected 0 to 65535"),
        ({"number": 1, "batch_size": 0}, "batch_size=0"),
        ({"number": 1, "copy_range": 0}, "copy_range=0"),
        ({"number": 1, "timeout": 0}, "timeout=0"),
    ]:
        with pytest.raises(ValueError, match=message):
            NfQueue(**kwargs)
