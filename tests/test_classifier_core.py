"""The Cython pieces under the compiler: Bitset, LabelIndex programs, Classifier layout,
batch forms and their errors. Decisions as a whole are compared with the reference
classifier in test_classifier.py."""

from __future__ import annotations

from array import array
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest

from egresscore.core.classifier import Action, Classifier, Gateway, Reason
from egresscore.core.selector import OP_ALL, OP_AND, OP_KEY, OP_NOT, OP_OR, OP_PAIRS, Bitset, LabelIndex
from egresscore.errors import InvalidAddressError

LABELS = [{"app": "web", "tier": "1"}, {"app": "db"}, {}, {"app": "web"}]


def test_bitset_basics() -> None:
    bits = Bitset.from_indices(70, [0, 64, 69])
    assert list(bits) == [0, 64, 69]
    assert len(bits) == 3 and 64 in bits and 1 not in bits and 70 not in bits and -1 not in bits
    other = Bitset.from_indices(70, [1, 64])
    assert list(bits & other) == [64]
    assert list(bits | other) == [0, 1, 64, 69]
    assert bits == Bitset.from_indices(70, [69, 64, 0])
    with pytest.raises(IndexError, match="index 70 out of range for a set of 70"):
        Bitset.from_indices(70, [70])
    with pytest.raises(ValueError, match="different sizes"):
        bits & Bitset.from_indices(3, [])
    with pytest.raises(TypeError):
        bits & None  # type: ignore[operator]
    with pytest.raises(TypeError):
        Bitset()


def test_bitset_expand_maps_owners() -> None:
    namespaces = Bitset.from_indices(3, [2])
    owner = array("I", [0, 2, 2, 1, 0xFFFFFFFF])
    assert list(namespaces.expand(owner)) == [1, 2]


def test_label_index_programs() -> None:
    index = LabelIndex(LABELS)
    web = index.pair_id("app", "web")
    db = index.pair_id("app", "db")
    assert index.pair_id("app", "none") == -1 and index.key_id("missing") == -1
    assert sorted(index.values("app")) == sorted([("web", web), ("db", db)])
    assert list(index.evaluate([OP_PAIRS, 1, web])) == [0, 3]
    assert list(index.evaluate([OP_PAIRS, 2, web, db])) == [0, 1, 3]
    # NOT of a missing-key test matches the objects without the key, as NotIn does.
    assert list(index.evaluate([OP_PAIRS, 1, web, OP_NOT])) == [1, 2]
    assert list(index.evaluate([OP_KEY, index.key_id("tier"), OP_NOT])) == [1, 2, 3]
    assert list(index.evaluate([OP_ALL])) == [0, 1, 2, 3]
    assert list(index.evaluate([OP_AND, 0])) == [0, 1, 2, 3]
    assert list(index.evaluate([OP_OR, 0])) == []
    program = [OP_PAIRS, 1, web, OP_KEY, index.key_id("tier"), OP_AND, 2, OP_PAIRS, 1, db, OP_OR, 2]
    assert list(index.evaluate(program)) == [0, 1]


@pytest.mark.parametrize(
    ("program", "message"),
    [
        ([OP_PAIRS, 1, 99], "pair id 99 out of range"),
        ([OP_KEY, 42], "key id 42 out of range"),
        ([OP_NOT], "NOT at 0 with an empty stack"),
        ([OP_ALL, OP_AND, 3], "AND of 3 sets at 1, but the stack holds 1"),
        ([OP_ALL, OP_ALL], "must leave one set, left 2"),
        ([17], "unknown opcode 17 at 0"),
        ([OP_PAIRS], "the program ends at 1 where an operand was expected"),
        ([OP_PAIRS, -2], r"operand -2 at 1: expected an integer from 0"),
        ([OP_PAIRS, 3, 0], "PAIRS at 0 names 3 pairs, but the program ends after 1"),
        ([OP_ALL, OP_AND, -1], r"operand -1 at 2: expected an integer"),
        ([OP_KEY, "x"], r"operand 'x' at 1"),
    ],
)
def test_label_index_rejects_bad_programs(program: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LabelIndex(LABELS).evaluate(program)


def small_classifier(local: bool = False) -> Classifier:
    """Two endpoints, one unit selecting endpoint 0; 203.0.113.0/24 redirects over
    two gateways, its /25 excluded; 2001:db8:100::/48 redirects over one v6 gateway."""
    gateways = [
        (11, 0, local, Gateway("gw-1", IPv4Address("192.0.2.10"))),
        (22, 1, False, Gateway("gw-2", IPv4Address("192.0.2.11"))),
        (33, 0, local, Gateway("gw-1", IPv6Address("2001:db8::10"))),
    ]
    return Classifier._build(
        [(ip_address("10.0.0.1"), 0), (ip_address("10.0.0.2"), 1), (ip_address("fd00::1"), 0)],
        [0, 1],
        ["policy-a"],
        [Bitset.from_indices(2, [0])],
        [
            (ip_network("203.0.113.128/25"), 0, -1),
            (ip_network("203.0.113.0/24"), 0, 0),
            (ip_network("2001:db8:100::/48"), 0, 0),
        ],
        [ip_network("10.0.0.0/8"), ip_network("fd00::/8")],
        [(0, False, 0, [0, 1], [2])],
        gateways,
    )


def test_small_classifier_decisions() -> None:
    classifier = small_classifier()
    redirect = classifier.classify("10.0.0.1", "203.0.113.7")
    assert (redirect.action, redirect.reason, redirect.policy) == (
        Action.REDIRECT,
        Reason.GATEWAY,
        "policy-a",
    )
    assert redirect.gateway in classifier.gateways[:2]
    assert classifier.classify("10.0.0.1", "203.0.113.200")[:3] == (Action.PASS, Reason.EXCLUDED, "policy-a")
    assert classifier.classify("10.0.0.2", "203.0.113.7")[:3] == (Action.PASS, Reason.NO_POLICY, None)
    assert classifier.classify("10.0.0.9", "203.0.113.7")[:2] == (Action.PASS, Reason.NOT_AN_ENDPOINT)
    assert classifier.classify("10.0.0.1", "10.0.0.2")[:2] == (Action.PASS, Reason.CLUSTER_INTERNAL)
    v6 = classifier.classify("fd00::1", "2001:db8:100::5")
    assert v6.gateway == Gateway("gw-1", IPv6Address("2001:db8::10"))
    assert small_classifier(local=True).classify("fd00::1", "2001:db8:100::5").action is Action.SNAT


def test_batch_codes_match_single_calls_in_both_families() -> None:
    classifier = small_classifier()
    sources = ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.9", "10.0.0.1"]
    destinations = ["203.0.113.7", "203.0.113.200", "203.0.113.7", "203.0.113.7", "10.0.0.2"]
    pairs = array("I")
    for src, dst in zip(sources, destinations, strict=True):
        pairs.extend((int(IPv4Address(src)), int(IPv4Address(dst))))
    codes = classifier.classify_many(pairs)
    for code, src, dst in zip(codes, sources, destinations, strict=True):
        single = classifier.classify(src, dst)
        assert classifier.decode(code)[:2] == single[:2]
        assert classifier.decode(code).gateway == single.gateway
        assert classifier.classify_code(src, dst)[0] == code
    packed = b"".join(
        IPv6Address(a).packed + IPv6Address(b).packed for a, b in [("fd00::1", "2001:db8:100::5")]
    )
    (code,) = classifier.classify_many6(packed)
    assert classifier.decode(code).gateway == Gateway("gw-1", IPv6Address("2001:db8::10"))
    out = array("I", [0] * 8)
    assert classifier.classify_many(pairs, out) is out and list(out[:5]) == list(codes)


def test_batch_and_decode_errors() -> None:
    classifier = small_classifier()
    with pytest.raises(ValueError, match="IPv4 pairs need an even number of uint32 items, got 1"):
        classifier.classify_many(array("I", [1]))
    # Another item type is refused, not read as uint32 pairs.
    with pytest.raises(ValueError, match="Buffer dtype mismatch"):
        classifier.classify_many(array("q", [1, 2]))
    with pytest.raises(ValueError, match="IPv6 pairs need a multiple of 32 bytes, got 16"):
        classifier.classify_many6(bytes(16))
    with pytest.raises(ValueError, match="out holds 1 codes, 2 needed"):
        classifier.classify_many(array("I", [1, 2, 3, 4]), out=array("I", [0]))
    with pytest.raises(ValueError, match="does not come from this classifier"):
        classifier.decode(0xFFFF07)
    with pytest.raises(InvalidAddressError, match="expected two addresses of one family"):
        classifier.classify("10.0.0.1", "2001:db8::1")
    with pytest.raises(InvalidAddressError):
        classifier.classify("10.0.0.1", "not an address")
    assert list(classifier.classify_many(array("I"))) == []


def test_build_rejects_inconsistent_tables() -> None:
    with pytest.raises(ValueError, match="unit 1 or rule 0 out of range"):
        Classifier._build(
            [],
            [],
            ["a"],
            [Bitset.from_indices(0, [])],
            [(ip_network("192.0.2.0/24"), 1, 0)],
            [],
            [(0, False, 0, [], [])],
            [],
        )
    with pytest.raises(ValueError, match="unit 0 has a set of 3 endpoints, expected 0"):
        Classifier._build([], [], ["a"], [Bitset.from_indices(3, [])], [], [], [], [])
    with pytest.raises(ValueError, match="gateway index 5 out of range"):
        Classifier._build([], [], [], [], [], [], [(0, False, 0, [5], [])], [])
    with pytest.raises(TypeError, match=r"made by egresscore\.policy\.compile_policies"):
        Classifier()
    with pytest.raises(ValueError, match=r"source address 10\.0\.0\.1 is listed for two endpoints"):
        Classifier._build(
            [(ip_address("10.0.0.1"), 0), (ip_address("10.0.0.1"), 1)], [0, 0], [], [], [], [], [], []
        )
    # Units are numbered in precedence order: a prefix listing unit 8 before unit 0 is refused
    # (the unit bitmaps of long lists rely on the order).
    members = [Bitset.from_indices(1, [0]) for _ in range(9)]
    out_of_order = [(ip_network("0.0.0.0/0"), 8, 0)] + [(ip_network("0.0.0.0/0"), u, 0) for u in range(8)]
    with pytest.raises(ValueError, match="unit 0 listed after unit 8"):
        Classifier._build(
            [(ip_address("10.0.0.1"), 0)],
            [0],
            [str(u) for u in range(9)],
            members,
            out_of_order,
            [],
            [(1, False, 0, [], [])],
            [],
        )
