"""The classifier against a straightforward pure-Python classifier, in the same run.

Workload (``_classifier_workload``): 1,000 policies, 10,000 endpoints and 100,000
destination prefixes in a timed run (20 / 300 / 2,000 in the CI smoke run), and
(source, destination) pairs of which about half come from selected pods. The peer is
``tests/reference/classifier.py``: dicts from IP to endpoint and from prefix to
candidates, selectors evaluated by the reference evaluator, everything in Python. It
is also the oracle of tests/test_classifier.py, so the two answer identically; every
benchmark here checks a sample of answers against it before its time counts.

Groups (``<kind>-<label>``): ``classify-batch`` (``classify_many``, per pair),
``classify-single`` (``classify(str, str)`` from Python, per call) and
``classify-compile`` (the whole snapshot: egresscore's compile_policies against the
peer's constructor, which precomputes its selector matches and prefix dicts).
"""

from __future__ import annotations

import random
import sys
from array import array
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Final

import _classifier_workload as workload
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from egresscore.core.classifier import Classifier
from egresscore.policy.compiler import compile_policies
from egresscore.policy.model import PolicySet

# The pure-Python peer lives with the tests' oracles (tests/ has no __init__.py).
TESTS_DIR: Final = Path(__file__).resolve().parent.parent / "tests"
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from reference.classifier import ReferenceClassifier  # noqa: E402

IMPLEMENTATIONS: Final = ("egresscore", "python-reference")
PAIR_SEED: Final = 7


@dataclass(frozen=True, slots=True)
class ClassifierSizes:
    label: str
    policies: int
    endpoints: int
    prefixes: int
    batch: int  # pairs per classify_many round
    python_batch: int  # pairs per round of the pure-Python peer
    single: int  # classify() calls per round
    rounds: int
    compile_rounds: int


FULL: Final = ClassifierSizes("1k-10k-100k", 1000, 10_000, 100_000, 100_000, 2_000, 2_000, 20, 3)
QUICK: Final = ClassifierSizes("20-300-2k", 20, 300, 2_000, 2_000, 200, 200, 1, 1)


def sizes_for(config: pytest.Config) -> ClassifierSizes:
    from conftest import quick_mode

    return QUICK if quick_mode(config) else FULL


class ClassifierBench:
    """The workload, both classifiers and the pairs, built once per session."""

    def __init__(self, sizes: ClassifierSizes) -> None:
        self.sizes = sizes
        self.policy_set: PolicySet = workload.build_workload(
            sizes.policies, sizes.endpoints, sizes.prefixes, seed=0
        )
        self.classifier: Classifier = compile_policies(self.policy_set)
        self.reference = ReferenceClassifier(self.policy_set)
        self.pairs = workload.make_pairs(self.policy_set, sizes.batch, seed=PAIR_SEED)
        self.texts = [
            (str(IPv4Address(self.pairs[2 * i])), str(IPv4Address(self.pairs[2 * i + 1])))
            for i in range(max(sizes.single, sizes.python_batch))
        ]

    def check(self, implementation: str, answers: list[Any], texts: list[tuple[str, str]]) -> None:
        """The answers for ``texts`` agree with the reference (action, reason, policy, gateway)."""
        rng = random.Random(1)
        sample = rng.sample(range(len(texts)), min(200, len(texts)))
        for i in sample:
            src, dst = texts[i]
            expected = self.reference.classify(src, dst)
            got = answers[i]
            if implementation == "egresscore":
                gateway = got.gateway
                got_values = (
                    got.action.name.lower(),
                    got.reason.name.lower(),
                    gateway.node if gateway else None,
                    str(gateway.egress_ip) if gateway else None,
                )
            else:
                got_values = (got.action, got.reason, got.gateway_node, got.egress_ip)
            want = (expected.action, expected.reason, expected.gateway_node, expected.egress_ip)
            assert got_values == want, f"{implementation}: {src} -> {dst}: {got_values} != {want}"


@pytest.fixture(scope="session")
def classifier_bench(pytestconfig: pytest.Config) -> ClassifierBench:
    return ClassifierBench(sizes_for(pytestconfig))


def describe(
    benchmark: BenchmarkFixture, kind: str, sizes: ClassifierSizes, implementation: str, method: str, ops: int
) -> None:
    benchmark.group = f"{kind}-{sizes.label}"
    benchmark.extra_info.update(
        implementation=implementation,
        kind=kind,
        method=method,
        ops_per_round=ops,
        policies=sizes.policies,
        endpoints=sizes.endpoints,
        prefixes=sizes.prefixes,
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_classify_batch(
    benchmark: BenchmarkFixture, classifier_bench: ClassifierBench, implementation: str
) -> None:
    """Decisions for a buffer of IPv4 (src, dst) pairs: egresscore's classify_many (no
    GIL, no Python object per pair) against the peer's classify() in a loop."""
    sizes = classifier_bench.sizes
    if implementation == "egresscore":
        classifier = classifier_bench.classifier
        pairs = classifier_bench.pairs
        out = array("I", bytes(4 * (len(pairs) // 2)))
        describe(benchmark, "classify-batch", sizes, implementation, "classify_many", len(out))
        benchmark.pedantic(  # type: ignore[no-untyped-call]
            classifier.classify_many, args=(pairs, out), rounds=sizes.rounds, warmup_rounds=1, iterations=1
        )
        answers = [classifier.decode(code) for code in out[: len(classifier_bench.texts)]]
    else:
        reference = classifier_bench.reference
        texts = classifier_bench.texts[: sizes.python_batch]
        describe(benchmark, "classify-batch", sizes, implementation, "classify() loop", len(texts))

        def run() -> list[Any]:
            return [reference.classify(src, dst) for src, dst in texts]

        answers = benchmark.pedantic(run, rounds=max(1, sizes.rounds // 4), warmup_rounds=0, iterations=1)  # type: ignore[no-untyped-call]
    classifier_bench.check(implementation, answers, classifier_bench.texts[: len(answers)])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_classify_single(
    benchmark: BenchmarkFixture, classifier_bench: ClassifierBench, implementation: str
) -> None:
    """One classify(src, dst) call from Python per pair, addresses as text."""
    sizes = classifier_bench.sizes
    texts = classifier_bench.texts[: sizes.single]
    target = classifier_bench.classifier if implementation == "egresscore" else classifier_bench.reference
    method = "classify(str, str)"
    describe(benchmark, "classify-single", sizes, implementation, method, len(texts))
    classify = target.classify

    def run() -> list[Any]:
        return [classify(src, dst) for src, dst in texts]

    rounds = sizes.rounds if implementation == "egresscore" else max(1, sizes.rounds // 4)
    answers = benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)  # type: ignore[no-untyped-call]
    classifier_bench.check(implementation, answers, texts)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_compile(benchmark: BenchmarkFixture, classifier_bench: ClassifierBench, implementation: str) -> None:
    """A full recompile of the snapshot: every selector, unit, gateway and prefix."""
    sizes = classifier_bench.sizes
    policy_set = classifier_bench.policy_set
    if implementation == "egresscore":
        describe(benchmark, "classify-compile", sizes, implementation, "compile_policies", 1)
        built = benchmark.pedantic(  # type: ignore[no-untyped-call]
            compile_policies, args=(policy_set,), rounds=sizes.compile_rounds, warmup_rounds=0, iterations=1
        )
        answers = [built.classify(src, dst) for src, dst in classifier_bench.texts]
    else:
        describe(benchmark, "classify-compile", sizes, implementation, "ReferenceClassifier()", 1)
        built = benchmark.pedantic(  # type: ignore[no-untyped-call]
            ReferenceClassifier,
            args=(policy_set,),
            rounds=sizes.compile_rounds,
            warmup_rounds=0,
            iterations=1,
        )
        answers = [built.classify(src, dst) for src, dst in classifier_bench.texts]
    classifier_bench.check(implementation, answers, classifier_bench.texts)
