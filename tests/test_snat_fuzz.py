"""Fuzzing egresscore.core.snat_table.SnatTable with random and mutated packets.

A corpus of valid packets of every kind tests/test_snat_packets.py checks one by one
(TCP/UDP/ICMP echo over IPv4 with and without options and IPv6 with extension headers,
replies, ICMP errors in both directions with quotes of several lengths, fragments,
unknown protocols) is mutated with a seeded numpy generator: byte flips, truncation,
extension, pure random bytes, random IP header fields. Over a million packets go through
``translate_outbound_many`` and again through ``translate_inbound_many``, in a forked
child so that a crash fails the test with the signal (and, from a replay through the
single-packet calls, the packet that crashed) instead of killing pytest.

Checked for every packet: a verdict in 0..9, the verdict counters growing by the number
of packets, and no byte written unless the verdict is TRANSLATED. Checked for a sample
of translated packets, with the independent checksum code of test_snat_packets: every
checksum that verified before still verifies, outbound sources are egress IPs, inbound
destinations are not. Hypothesis then feeds arbitrary bytes to the single-packet calls.
"""

from __future__ import annotations

import faulthandler
import ipaddress
import multiprocessing
import os
import random
import signal
import time
import traceback
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# tests/ has no __init__.py, so pytest puts tests/ itself on sys.path.
from test_snat_packets import (
    EGRESS4,
    EGRESS6,
    NOW,
    PORT_RANGE,
    checksum_report,
    flow_corpus,
    load_snat,
    parse_ip,
)

FUZZ_PACKETS = 1_000_000
CHUNK = 125_000
SAMPLE = 20_000  # translated packets re-checked per direction
SEED = 0x5EED_F022
EGRESS_IPS = [EGRESS4, EGRESS6, "192.0.2.11", "2001:db8::11"]
VERDICT_COUNT = 10
CHILD_TIMEOUT = 240.0

# Mutation kinds and their shares.
CLEAN, FLIP, TRUNCATE, EXTEND, RANDOM, RANDOM_IP, FIELD = range(7)
MUTATION_SHARES = np.array([0.12, 0.30, 0.13, 0.07, 0.08, 0.08, 0.22])


def new_fuzz_table(**kwargs: Any) -> Any:
    options: dict[str, Any] = {"port_range": PORT_RANGE, "max_entries": 1 << 15, "seed": 7}
    options.update(kwargs)
    return load_snat().SnatTable(EGRESS_IPS, **options)


def verdict_total(table: Any) -> int:
    """The sum of the per-verdict counters (named after the verdicts; any prefix such as a direction)."""
    names = {verdict.name.lower() for verdict in load_snat().Verdict}
    counters = table.counters()
    keys = [key for key in counters if key.rsplit(".", 1)[-1].lower() in names]
    assert len(keys) >= VERDICT_COUNT, f"no per-verdict counters in {sorted(counters)}"
    return sum(counters[key] for key in keys)


# --- the corpus and its mutations ---------------------------------------------------------------


class Corpus:
    def __init__(self, packets: list[bytes]) -> None:
        self.packets = packets
        self.blob = np.frombuffer(b"".join(packets), dtype=np.uint8)
        self.lengths = np.array([len(packet) for packet in packets], dtype=np.int64)
        self.starts = np.zeros(len(packets), dtype=np.int64)
        self.starts[1:] = np.cumsum(self.lengths)[:-1]


def build_corpus(table: Any) -> Corpus:
    """Valid packets of every kind, their flows opened through ``table``, in a fixed order."""
    outbound, inbound = flow_corpus(table, random.Random(SEED), flows=400)
    return Corpus(outbound + inbound)


def mutated_batch(
    corpus: Corpus, rng: np.random.Generator, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(buffer, offsets, mutation kind per packet): n packets made from the corpus, in one uint8 buffer."""
    kind = rng.choice(len(MUTATION_SHARES), size=n, p=MUTATION_SHARES / MUTATION_SHARES.sum())
    base = rng.integers(0, len(corpus.packets), size=n)
    source_length = corpus.lengths[base]
    lengths = source_length.copy()
    cut = kind == TRUNCATE
    lengths[cut] = (rng.random(int(cut.sum())) * source_length[cut]).astype(np.int64)
    grow = kind == EXTEND
    lengths[grow] += rng.integers(1, 80, size=int(grow.sum()))
    fresh = (kind == RANDOM) | (kind == RANDOM_IP)
    lengths[fresh] = rng.integers(0, 140, size=int(fresh.sum()))
    lengths[kind == RANDOM_IP] = np.maximum(lengths[kind == RANDOM_IP], 48)

    offsets = np.zeros(n + 1, dtype=np.uint32)
    offsets[1:] = np.cumsum(lengths)
    total = int(offsets[-1])
    buffer = rng.integers(0, 256, size=total, dtype=np.uint8)
    packet_of = np.repeat(np.arange(n, dtype=np.int32), lengths)
    within = np.arange(total, dtype=np.int64) - offsets[:-1].astype(np.int64)[packet_of]
    copy = (within < source_length[packet_of]) & ~fresh[packet_of]
    buffer[copy] = corpus.blob[corpus.starts[base[packet_of[copy]]] + within[copy]]
    del packet_of, within, copy

    starts = offsets[:-1].astype(np.int64)
    # Byte flips: 1 to 4 random bytes XORed with a non-zero value.
    flips = np.flatnonzero((kind == FLIP) & (lengths > 0))
    count = rng.integers(1, 5, size=flips.size)
    for round_ in range(4):
        chosen = flips[count > round_]
        positions = starts[chosen] + rng.integers(0, 1 << 30, size=chosen.size) % lengths[chosen]
        buffer[positions] ^= rng.integers(1, 256, size=chosen.size, dtype=np.uint8)
    # Random IP-looking packets: version and length fields right, protocol one the table knows.
    shaped = np.flatnonzero(kind == RANDOM_IP)
    six = rng.random(shaped.size) < 0.5
    s4, s6 = starts[shaped[~six]], starts[shaped[six]]
    buffer[s4] = 0x45
    buffer[s4 + 2] = (lengths[shaped[~six]] >> 8).astype(np.uint8)
    buffer[s4 + 3] = (lengths[shaped[~six]] & 0xFF).astype(np.uint8)
    buffer[s4 + 6] &= 0x40  # no fragment offset, no MF
    buffer[s4 + 7] = 0
    buffer[s4 + 9] = rng.choice(np.array([1, 6, 17], dtype=np.uint8), size=s4.size)
    buffer[s6] = 0x60
    buffer[s6 + 4] = ((lengths[shaped[six]] - 40) >> 8).astype(np.uint8)
    buffer[s6 + 5] = ((lengths[shaped[six]] - 40) & 0xFF).astype(np.uint8)
    buffer[s6 + 6] = rng.choice(np.array([0, 6, 17, 43, 44, 58, 60], dtype=np.uint8), size=s6.size)
    # Header fields set to random values.
    fields = np.flatnonzero((kind == FIELD) & (lengths >= 8))
    which = rng.integers(0, 6, size=fields.size)
    at = starts[fields]
    value = rng.integers(0, 256, size=(fields.size, 2), dtype=np.uint8)
    pick = which == 0  # the IHL nibble
    buffer[at[pick]] = (buffer[at[pick]] & 0xF0) | (value[pick, 0] & 15)
    pick = which == 1  # IPv4 total length (IPv6: flow label)
    buffer[at[pick] + 2], buffer[at[pick] + 3] = value[pick, 0], value[pick, 1]
    pick = which == 2  # IPv6 payload length (IPv4: identification)
    buffer[at[pick] + 4], buffer[at[pick] + 5] = value[pick, 0], value[pick, 1]
    pick = which == 3  # version and IHL
    buffer[at[pick]] = value[pick, 0]
    pick = which == 4  # a length field off by a little from the truth
    delta = (value[pick, 0].astype(np.int64) % 17) - 8
    v4 = (buffer[at[pick]] >> 4) == 4
    claimed = np.where(v4, lengths[fields[pick]], lengths[fields[pick]] - 40) + delta
    claimed = np.clip(claimed, 0, 0xFFFF)
    field_at = np.where(v4, at[pick] + 2, at[pick] + 4)
    buffer[field_at] = (claimed >> 8).astype(np.uint8)
    buffer[field_at + 1] = (claimed & 0xFF).astype(np.uint8)
    pick = which == 5  # the protocol / next header
    protocol_at = np.where((buffer[at[pick]] >> 4) == 6, at[pick] + 6, at[pick] + 9)
    buffer[protocol_at] = value[pick, 0]
    return buffer, offsets, kind


def egress_indices_for(buffer: np.ndarray, offsets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The egress IP of each packet's family (an empty packet counts as IPv4); 3% the other family."""
    n = offsets.size - 1
    lengths = np.diff(offsets.astype(np.int64))
    first = np.where(
        lengths > 0, buffer[np.minimum(offsets[:-1].astype(np.int64), max(buffer.size - 1, 0))], 0
    )
    six = (first >> 4) == 6
    other = rng.integers(0, 2, size=n)  # the first or second egress IP of the family
    indices = np.where(six, 1 + 2 * other, 2 * other).astype(np.uint16)
    swap = rng.random(n) < 0.03
    indices[swap] ^= 1
    return indices


# --- the checks ---------------------------------------------------------------------------------


def check_batch(
    direction: str,
    original: np.ndarray,
    buffer: np.ndarray,
    offsets: np.ndarray,
    verdicts: np.ndarray,
    partial: np.ndarray,
    egress: set[bytes],
    rng: np.random.Generator,
    sample: int,
    failures: list[str],
) -> dict[str, int]:
    bad = np.flatnonzero(verdicts >= VERDICT_COUNT)
    for i in bad[:5]:
        failures.append(f"{direction}: packet {i} got verdict {verdicts[i]}")
    if bad.size:
        return {}
    written = np.flatnonzero(buffer != original)
    if written.size:
        packet_of = np.searchsorted(offsets, written, side="right") - 1
        untranslated = np.unique(packet_of[verdicts[packet_of] != 0])
        for i in untranslated[:5]:
            begin, end = int(offsets[i]), int(offsets[i + 1])
            failures.append(
                f"{direction}: packet {i} got verdict {verdicts[i]} but was written:\n"
                f"  before {original[begin:end].tobytes().hex()}\n"
                f"  after  {buffer[begin:end].tobytes().hex()}"
            )
    translated = np.flatnonzero((verdicts == 0) & (partial == 0))
    chosen = rng.choice(translated, size=min(sample, translated.size), replace=False)
    for i in chosen:
        begin, end = int(offsets[i]), int(offsets[i + 1])
        before = original[begin:end].tobytes()
        after = buffer[begin:end].tobytes()
        problems = []
        old, new = checksum_report(before), checksum_report(after)
        lost = [name for name, ok in old.items() if ok and not new.get(name)]
        if lost:
            problems.append(f"checksums {lost} verified before, not after ({old} -> {new})")
        ip = parse_ip(after)
        if ip is None:
            problems.append("no longer parses")
        elif direction == "outbound" and ip.src not in egress:
            problems.append("source is not an egress IP")
        elif direction == "inbound" and ip.dst in egress:
            problems.append("destination is still an egress IP")
        if problems:
            failures.append(
                f"{direction}: packet {i} TRANSLATED: {'; '.join(problems)}\n"
                f"  before {before.hex()}\n  after  {after.hex()}"
            )
    return {"translated": int((verdicts == 0).sum()), "checked": int(chosen.size)}


def fuzz(packets: int, progress: Any = None) -> dict[str, Any]:
    """The whole fuzz run, meant for a child process; returns statistics and failure messages."""
    Verdict = load_snat().Verdict
    table = new_fuzz_table()
    corpus = build_corpus(table)
    egress = {ipaddress.ip_address(address).packed for address in EGRESS_IPS}
    failures: list[str] = []
    histogram = {"outbound": np.zeros(VERDICT_COUNT, np.int64), "inbound": np.zeros(VERDICT_COUNT, np.int64)}
    checked = {"outbound": 0, "inbound": 0}
    chunks = (packets + CHUNK - 1) // CHUNK
    started = time.perf_counter()
    translate_seconds = 0.0
    for chunk in range(chunks):
        n = min(CHUNK, packets - chunk * CHUNK)
        rng = np.random.default_rng([SEED, chunk])
        original, offsets, _ = mutated_batch(corpus, rng, n)
        indices = egress_indices_for(original, offsets, rng)
        partial = (rng.random(n) < 1 / 16).astype(np.uint8)
        now = NOW + chunk
        for direction in ("outbound", "inbound"):
            if progress is not None:
                progress[0], progress[1] = chunk, 0 if direction == "outbound" else 1
            buffer = original.copy()
            verdicts = np.full(n, 255, dtype=np.uint8)
            before = verdict_total(table)
            tick = time.perf_counter()
            if direction == "outbound":
                result = table.translate_outbound_many(
                    buffer,
                    offsets,
                    None,
                    now,
                    egress_indices=indices,
                    checksum_partial=partial,
                    verdicts=verdicts,
                )
            else:
                result = table.translate_inbound_many(
                    buffer, offsets, now, checksum_partial=partial, verdicts=verdicts
                )
            translate_seconds += time.perf_counter() - tick
            if result is not verdicts:
                failures.append(f"{direction}: the verdicts array passed in was not returned")
            grown = verdict_total(table) - before
            if grown != n:
                failures.append(f"{direction} chunk {chunk}: verdict counters grew by {grown}, not {n}")
            histogram[direction] += np.bincount(
                np.minimum(verdicts, VERDICT_COUNT - 1), minlength=VERDICT_COUNT
            )
            stats = check_batch(
                direction,
                original,
                buffer,
                offsets,
                verdicts,
                partial,
                egress,
                rng,
                SAMPLE // chunks,
                failures,
            )
            checked[direction] += stats.get("checked", 0)
            if len(failures) > 30:
                break
        if len(failures) > 30:
            break
    return {
        "failures": failures,
        "histogram": {
            d: {Verdict(v).name: int(c) for v, c in enumerate(h) if c} for d, h in histogram.items()
        },
        "checked": checked,
        "seconds": time.perf_counter() - started,
        "translate_seconds": translate_seconds,
        "entries": len(table),
    }


def replay_singly(packets: int, crash_chunk: int, crash_direction: int, shared: Any) -> None:
    """Redo the fuzz up to the crashing batch, then that batch one packet at a time, noting each packet."""
    table = new_fuzz_table()
    corpus = build_corpus(table)
    for chunk in range(crash_chunk + 1):
        n = min(CHUNK, packets - chunk * CHUNK)
        rng = np.random.default_rng([SEED, chunk])
        original, offsets, _ = mutated_batch(corpus, rng, n)
        indices = egress_indices_for(original, offsets, rng)
        partial = (rng.random(n) < 1 / 16).astype(np.uint8)
        now = NOW + chunk
        for direction in (0, 1):
            buffer = original.copy()
            if chunk < crash_chunk or direction < crash_direction:
                if direction == 0:
                    table.translate_outbound_many(
                        buffer, offsets, None, now, egress_indices=indices, checksum_partial=partial
                    )
                else:
                    table.translate_inbound_many(buffer, offsets, now, checksum_partial=partial)
                continue
            for i in range(n):
                packet = bytearray(buffer[int(offsets[i]) : int(offsets[i + 1])].tobytes())
                shared["length"].value = len(packet)
                shared["packet"][: len(packet)] = bytes(packet)
                shared["index"].value = i
                if direction == 0:
                    table.translate_outbound(
                        packet, EGRESS_IPS[int(indices[i])], now, checksum_partial=bool(partial[i])
                    )
                else:
                    table.translate_inbound(packet, now, checksum_partial=bool(partial[i]))
            return


# --- running in a child -------------------------------------------------------------------------


def _child(target: Callable[..., Any], args: tuple[Any, ...], connection: Any) -> None:
    try:
        connection.send(("ok", target(*args)))
    except BaseException:
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


def run_isolated(
    target: Callable[..., Any], *args: Any, timeout: float = CHILD_TIMEOUT
) -> tuple[str, Any, int]:
    """Run target(*args) in a forked child.

    Returns ("ok", result, 0), ("error", traceback, 0), or ("died", None or "timeout", exit code).
    """
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(target, args, sender))
    child.start()
    sender.close()
    message = None
    if receiver.poll(timeout):
        try:
            message = receiver.recv()
        except EOFError:
            message = None
    child.join(5 if message is not None else 0.1)
    if child.is_alive():
        child.kill()
        child.join()
        if message is None:
            return "died", "timeout", 0
    if message is None:
        return "died", None, child.exitcode or 0
    return message[0], message[1], child.exitcode or 0


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def crash_report(packets: int, progress: Any, code: int) -> str:
    chunk, direction = int(progress[0]), int(progress[1])
    name = ("translate_outbound_many", "translate_inbound_many")[direction]
    report = f"the fuzz child was {describe_exit(code)} in {name}, batch {chunk}"
    context = multiprocessing.get_context("fork")
    shared = {
        "index": context.RawValue("q", -1),
        "length": context.RawValue("q", 0),
        "packet": context.RawArray("B", 1 << 17),
    }
    status, _, replay_code = run_isolated(replay_singly, packets, chunk, direction, shared)
    if status == "died" and shared["index"].value >= 0:
        packet = bytes(shared["packet"][: shared["length"].value])
        single = ("translate_outbound", "translate_inbound")[direction]
        report += (
            f"; replayed one by one, {single} was {describe_exit(replay_code)} on packet "
            f"{shared['index'].value}: {packet.hex()}"
        )
    else:
        report += f"; a one-by-one replay did not crash ({status})"
    return report


def test_fuzz_a_million_packets_both_directions() -> None:
    load_snat()  # an import failure is reported here, not as a crash of the child
    context = multiprocessing.get_context("fork")
    progress = context.RawArray("q", 2)
    status, result, code = run_isolated(fuzz, FUZZ_PACKETS, progress)
    if status == "died":
        pytest.fail(
            crash_report(FUZZ_PACKETS, progress, code) if result != "timeout" else "the fuzz child timed out"
        )
    assert status == "ok", result
    summary = (
        f"verdicts {result['histogram']}, re-checked {result['checked']}, "
        f"{result['seconds']:.1f} s ({result['translate_seconds']:.2f} s in the table)"
    )
    print(summary)
    assert not result["failures"], "\n".join(result["failures"][:30]) + "\n" + summary
    # The corpus is not wasted: plenty of packets get through, and a sample was re-checked.
    for direction in ("outbound", "inbound"):
        assert result["histogram"][direction].get("TRANSLATED", 0) > FUZZ_PACKETS // 50, summary
        assert sum(result["histogram"][direction].values()) == FUZZ_PACKETS, summary
        assert result["checked"][direction] >= SAMPLE * 0.9, summary


# --- batch calls against single calls -----------------------------------------------------------


def batch_against_single(packets: int) -> list[str]:
    """Two tables, same seed and corpus: one gets batches, the other the same packets one by one."""
    batch_table = new_fuzz_table(max_entries=1 << 20)
    single_table = new_fuzz_table(max_entries=1 << 20)
    corpus = build_corpus(batch_table)
    assert build_corpus(single_table).packets == corpus.packets
    rng = np.random.default_rng([SEED, 99])
    original, offsets, _ = mutated_batch(corpus, rng, packets)
    indices = egress_indices_for(original, offsets, rng)
    partial = (rng.random(packets) < 1 / 16).astype(np.uint8)
    failures: list[str] = []
    for direction in ("outbound", "inbound"):
        buffer = original.copy()
        if direction == "outbound":
            verdicts = np.asarray(
                batch_table.translate_outbound_many(
                    buffer, offsets, None, NOW, egress_indices=indices, checksum_partial=partial
                )
            )
        else:
            verdicts = np.asarray(
                batch_table.translate_inbound_many(buffer, offsets, NOW, checksum_partial=partial)
            )
        for i in range(packets):
            begin, end = int(offsets[i]), int(offsets[i + 1])
            packet = bytearray(original[begin:end].tobytes())
            if direction == "outbound":
                verdict = single_table.translate_outbound(
                    packet, EGRESS_IPS[int(indices[i])], NOW, checksum_partial=bool(partial[i])
                )
            else:
                verdict = single_table.translate_inbound(packet, NOW, checksum_partial=bool(partial[i]))
            if verdict != verdicts[i] or bytes(packet) != buffer[begin:end].tobytes():
                failures.append(
                    f"{direction} packet {i} {original[begin:end].tobytes().hex()}: batch {verdicts[i]} "
                    f"{buffer[begin:end].tobytes().hex()}, single {int(verdict)} {bytes(packet).hex()}"
                )
                if len(failures) >= 10:
                    return failures
    if set(batch_table.entries()) != set(single_table.entries()):
        failures.append("the two tables hold different entries")
    return failures


def test_batches_match_single_calls() -> None:
    load_snat()
    status, result, code = run_isolated(batch_against_single, 40_000)
    assert status != "died", f"the child was {describe_exit(code)}"
    assert status == "ok", result
    assert not result, "\n".join(result)


# --- Hypothesis: arbitrary bytes through the single-packet calls --------------------------------


@cache
def hypothesis_setup() -> tuple[Any, list[bytes]]:
    table = new_fuzz_table(max_entries=1 << 12)
    return table, build_corpus(table).packets


def check_single(table: Any, data: bytes, egress: str | None) -> None:
    Verdict = load_snat().Verdict
    buffer = bytearray(data)
    if egress is None:
        verdict = table.translate_inbound(buffer, NOW)
    else:
        verdict = table.translate_outbound(buffer, egress, NOW)
    assert isinstance(verdict, Verdict) and 0 <= int(verdict) < VERDICT_COUNT
    if verdict != Verdict.TRANSLATED:
        assert bytes(buffer) == data, f"{verdict.name} but written: {data.hex()} -> {bytes(buffer).hex()}"
        return
    assert len(buffer) == len(data)
    old, new = checksum_report(data), checksum_report(buffer)
    lost = [name for name, ok in old.items() if ok and not new.get(name)]
    assert not lost, f"checksums {lost} broken: {data.hex()} -> {bytes(buffer).hex()}"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=160))
def test_arbitrary_bytes(data: bytes) -> None:
    table, _ = hypothesis_setup()
    for egress in (EGRESS4, EGRESS6, None):
        check_single(table, data, egress)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.data(),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    st.one_of(st.none(), st.integers(0, 200)),
    st.binary(max_size=24),
)
def test_mutated_corpus_packets(
    data: Any, writes: list[tuple[int, int]], cut: int | None, tail: bytes
) -> None:
    table, packets = hypothesis_setup()
    packet = bytearray(data.draw(st.sampled_from(packets), label="packet"))
    for position, value in writes:
        if packet:
            packet[position % len(packet)] = value
    if cut is not None:
        packet = packet[:cut]
    mutated = bytes(packet) + tail
    egress = EGRESS6 if mutated and mutated[0] >> 4 == 6 else EGRESS4
    check_single(table, mutated, egress)
    check_single(table, mutated, None)


def test_child_runner_reports_a_crash() -> None:
    """The isolation itself: a child killed by a signal comes back as "died" with the signal."""
    assert run_isolated(sum, [1, 2]) == ("ok", 3, 0)

    def die() -> None:
        faulthandler.disable()  # no traceback dump from the deliberate crash
        os.kill(os.getpid(), signal.SIGSEGV)

    status, _, code = run_isolated(die)
    assert status == "died" and describe_exit(code) == "killed by SIGSEGV"
