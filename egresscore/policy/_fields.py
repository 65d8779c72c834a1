"""Typed field readers for the policy loaders, collecting errors at their field paths.

A :class:`FieldReader` reads one document. Each reader method checks one value,
records a :class:`~egresscore.errors.PolicyError` for every fault it finds and returns
``None`` for a value it could not read, so that the caller can go on and report the
other faults of the document too. A caller knows a part of the document is sound when
no error was recorded while reading it (:meth:`FieldReader.mark`, :meth:`FieldReader.clean_since`).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
from collections.abc import Collection, Mapping

from egresscore.errors import PolicyError
from egresscore.policy.calico_selector import SelectorSyntaxError, parse_calico_selector
from egresscore.policy.model import (
    CALICO_NAMESPACE_SELECTOR_ANNOTATION,
    CALICO_POLICY_ANNOTATION,
    CALICO_SELECTOR_ANNOTATION,
    IPAddress,
    IPNetwork,
)
from egresscore.policy.selector import MATCH_ALL, And, HasLabel, LabelIn, Not, Selector

__all__ = [
    "INT32_MAX",
    "INT32_MIN",
    "FieldReader",
    "cidr_problem",
    "describe",
    "field_path",
    "interface_problem",
    "item_path",
    "label_key_problem",
    "label_value_problem",
]

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_LABEL_NAME = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?")
_PREFIX_LENGTH = re.compile(r"[0-9]{1,3}")
_NAME_RULE = "letters, digits, '-', '_' or '.', beginning and ending with a letter or digit"
_SELECTOR_FORMS = "a LabelSelector mapping (matchLabels, matchExpressions) or a Calico selector expression"


def field_path(base: str, key: str) -> str:
    """The path of ``key`` inside the mapping at ``base``: ``spec.rules``, or
    ``matchLabels["app.kubernetes.io/name"]`` for a key that is not a plain name."""
    if _PLAIN_KEY.fullmatch(key):
        return f"{base}.{key}" if base else key
    return f"{base}[{json.dumps(key, ensure_ascii=False)}]"


def item_path(base: str, index: int) -> str:
    """The path of item ``index`` of the list at ``base``."""
    return f"{base}[{index}]"


def describe(value: object) -> str:
    """What ``value`` is, for "expected X, got Y" messages (YAML's words, not Python's)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        if not value:
            return "an empty string"
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"a string ({shown!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, datetime.date):
        return f"a date ({value.isoformat()})"
    if isinstance(value, bytes):
        return "binary data"
    if isinstance(value, set):
        return "a set"
    return f"a {type(value).__name__}"


#: Cilium label sources that stand for the Kubernetes labels of a pod, namespace or node.
CILIUM_LABEL_SOURCES = ("k8s", "any")


def label_key_problem(key: str) -> str | None:
    """Why ``key`` is not a Kubernetes label key, or ``None`` when it is one."""
    parts = key.split("/")
    if len(parts) > 2:
        return (
            f"label key {key!r} has more than one '/': expected an optional DNS subdomain prefix, '/', a name"
        )
    if len(parts) == 2:
        prefix, name = parts
        if not prefix:
            return f"label key {key!r} has an empty prefix: expected a DNS subdomain before '/'"
        if len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix):
            return (
                f"label key {key!r} has an invalid prefix {prefix!r}: expected a DNS subdomain of at most "
                "253 lowercase letters, digits, '-' and '.', beginning and ending with a letter or digit"
            )
        if len(name) > 63 or not _LABEL_NAME.fullmatch(name):
            return f"label key {key!r} has an invalid name {name!r}: expected 1 to 63 {_NAME_RULE}"
        return None
    if len(key) > 63 or not _LABEL_NAME.fullmatch(key):
        return f"invalid label key {key!r}: expected 1 to 63 {_NAME_RULE}, with an optional prefix and '/'"
    return None


def label_value_problem(value: str) -> str | None:
    """Why ``value`` is not a Kubernetes label value, or ``None`` when it is one."""
    if value == "" or (len(value) <= 63 and _LABEL_NAME.fullmatch(value)):
        return None
    return f"invalid label value {value!r}: expected at most 63 {_NAME_RULE}, or an empty value"


def interface_problem(name: str) -> str | None:
    """Why ``name`` cannot be a Linux interface name (``dev_valid_name`` in
    net/core/dev.c), or ``None`` when it can."""
    if not name or len(name) > 15 or name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
        return f"invalid interface name {name!r}: expected 1 to 15 characters without '/', ':' or whitespace"
    return None


def cidr_problem(text: str) -> IPNetwork | str:
    """``text`` as a network, or the message saying why it is not a strict CIDR."""
    address_text, slash, length_text = text.partition("/")
    try:
        address = ipaddress.ip_address(address_text) if "%" not in address_text else None
    except ValueError:
        address = None
    if address is None:
        return f"{text!r} is not a CIDR: {address_text!r} is not an IPv4 or IPv6 address"
    if not slash:
        example = f"{address}/{address.max_prefixlen}"
        return f"{text!r} is not a CIDR: expected an address and a prefix length, such as {example}"
    if not _PREFIX_LENGTH.fullmatch(length_text) or int(length_text) > address.max_prefixlen:
        return (
            f"{text!r} is not a CIDR: expected a prefix length from 0 to {address.max_prefixlen} "
            f"for IPv{address.version}, got {length_text!r}"
        )
    network = ipaddress.ip_network(f"{address}/{int(length_text)}", strict=False)
    if network.network_address != address:
        return f"{text!r} has host bits set: expected the network address {network}"
    return network


def selector_syntax_message(error: SelectorSyntaxError) -> str:
    """The message for a Calico selector syntax error; the parser's own names the position."""
    return f"invalid Calico selector: {error}"


class ExpansionError(Exception):
    """A file holds more values than a policy file plausibly can (see WorkBudget)."""


class WorkBudget:
    """How many more mappings and list items the documents of one file may hold.

    YAML aliases let a few kilobytes name the same list a million times over (the
    "billion laughs" shape); the safe loader builds that cheaply, but reading every
    repetition would not be. A mapping or list item takes a few bytes of text at the
    very least, so a file of ``size`` characters without aliases stays far below
    ``100,000 + size // 2``; only repetition through aliases reaches it."""

    def __init__(self, size: int = 0) -> None:
        self.limit = 100_000 + size // 2
        self.left = self.limit

    def spend(self, amount: int) -> None:
        self.left -= amount
        if self.left < 0:
            raise ExpansionError(
                f"the file holds more than {self.limit:,} mappings and list items for its size (YAML "
                "aliases that repeat the same data?): expected each object written out once"
            )


class FieldReader:
    """Reads the fields of one document and collects every error found in it."""

    def __init__(self, source: str, document: str, budget: WorkBudget | None = None) -> None:
        self.source = source
        self.document = document
        self.budget = WorkBudget() if budget is None else budget
        self.errors: list[PolicyError] = []
        # Cilium names the source of a label in selector keys ("k8s:app"); the loader
        # turns this on for Cilium documents, where "k8s:" and "any:" mean a pod label.
        self.cilium_label_sources = False

    # -- errors ---------------------------------------------------------------------

    def fail(self, path: str, message: str) -> None:
        """Record an error at ``path`` of this document."""
        self.errors.append(PolicyError(message, source=self.source, document=self.document, path=path))

    def mark(self) -> int:
        """A point to ask :meth:`clean_since` about."""
        return len(self.errors)

    def clean_since(self, mark: int) -> bool:
        """Whether no error was recorded since :meth:`mark` returned ``mark``."""
        return len(self.errors) == mark

    def where(self, path: str) -> str:
        """``source, document, path`` as text, to name the first of two definitions."""
        return ", ".join(part for part in (self.source, self.document, path) if part)

    # -- structure --------------------------------------------------------------------

    def mapping(self, value: object, path: str, what: str = "a mapping") -> dict[str, object] | None:
        """``value`` as a mapping with string keys; ``None`` (and an error) otherwise."""
        self.budget.spend(1)
        if not isinstance(value, dict):
            self.fail(path, f"expected {what}, got {describe(value)}")
            return None
        result: dict[str, object] = {}
        for key, item in value.items():
            if isinstance(key, str):
                result[key] = item
            else:
                self.fail(path, f"keys must be strings, got {describe(key)} as a key")
        return result

    def check_fields(
        self,
        mapping: Mapping[str, object],
        path: str,
        allowed: Collection[str],
        required: Mapping[str, str] | None = None,
    ) -> None:
        """Report fields of ``mapping`` not in ``allowed``, and missing ``required`` ones
        (field name -> what is expected there)."""
        for key in mapping:
            if key not in allowed:
                self.fail(
                    field_path(path, key),
                    f"unknown field {key!r}: expected one of {', '.join(sorted(allowed))}",
                )
        for key, what in (required or {}).items():
            if key not in mapping:
                self.fail(field_path(path, key), f"required field {key!r} is missing: expected {what}")

    def sequence(
        self, value: object, path: str, what: str, *, non_empty: bool = False
    ) -> list[object] | None:
        """``value`` as a list (of ``what``, for the message)."""
        if isinstance(value, list):
            self.budget.spend(len(value))
        if not isinstance(value, list):
            self.fail(
                path, f"expected a {'non-empty ' if non_empty else ''}list of {what}, got {describe(value)}"
            )
            return None
        if non_empty and not value:
            self.fail(path, f"expected a non-empty list of {what}, got an empty list")
            return None
        return value

    # -- scalars ----------------------------------------------------------------------

    def string(
        self, value: object, path: str, what: str = "a string", *, non_empty: bool = False
    ) -> str | None:
        """``value`` as a string; YAML's unquoted ``true``, ``80`` and dates are not strings."""
        if not isinstance(value, str):
            hint = ": put it in quotes" if isinstance(value, bool | int | float | datetime.date) else ""
            self.fail(path, f"expected {what}, got {describe(value)}{hint}")
            return None
        if non_empty and not value:
            self.fail(path, f"expected {what}, got an empty string")
            return None
        return value

    def name(self, value: object, path: str, what: str = "a name") -> str | None:
        """A required, non-empty name."""
        return self.string(value, path, f"{what} (a non-empty string)", non_empty=True)

    def integer(self, value: object, path: str, low: int, high: int) -> int | None:
        """``value`` as an integer from ``low`` to ``high`` (YAML booleans are not integers)."""
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"expected an integer from {low} to {high}, got {describe(value)}")
            return None
        if not low <= value <= high:
            self.fail(path, f"{value} is out of range: expected an integer from {low} to {high}")
            return None
        return value

    def boolean(self, value: object, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {describe(value)}")
            return None
        return value

    def choice(self, value: object, path: str, what: str, choices: Collection[str]) -> str | None:
        """One of ``choices`` (case-sensitive), listed in their given order on error."""
        text = self.string(value, path, f"one of {', '.join(choices)}")
        if text is not None and text not in choices:
            self.fail(path, f"unknown {what} {text!r}: expected one of {', '.join(choices)}")
            return None
        return text

    def interface(self, value: object, path: str) -> str | None:
        text = self.string(value, path, "an interface name")
        if text is None:
            return None
        problem = interface_problem(text)
        if problem:
            self.fail(path, problem)
            return None
        return text

    # -- addresses ----------------------------------------------------------------------

    def ip(self, value: object, path: str) -> IPAddress | None:
        """An IPv4 or IPv6 address, without prefix length or zone."""
        text = self.string(value, path, "an IP address string")
        if text is None:
            return None
        try:
            if "%" in text:
                raise ValueError(text)
            return ipaddress.ip_address(text)
        except ValueError:
            if "/" in text:
                self.fail(path, f"{text!r} is not an IP address: expected an address without a prefix length")
            else:
                self.fail(
                    path,
                    f"{text!r} is not an IP address: expected an IPv4 or IPv6 address such as 192.0.2.10",
                )
            return None

    def ips(
        self,
        value: object,
        path: str,
        *,
        non_empty: bool = False,
        one_per_family: bool = False,
    ) -> tuple[IPAddress, ...] | None:
        """A list of addresses; with ``one_per_family`` at most one IPv4 and one IPv6."""
        items = self.sequence(value, path, "IP address strings", non_empty=non_empty)
        if items is None:
            return None
        mark = self.mark()
        result: list[IPAddress] = []
        first_of_family: dict[int, tuple[IPAddress, str]] = {}
        for index, item in enumerate(items):
            here = item_path(path, index)
            address = self.ip(item, here)
            if address is None:
                continue
            if one_per_family:
                if address.version in first_of_family:
                    first, first_path = first_of_family[address.version]
                    self.fail(
                        here,
                        f"{address} is a second IPv{address.version} address (the first is {first} at "
                        f"{first_path}): expected at most one address per family",
                    )
                    continue
                first_of_family[address.version] = (address, here)
            elif address in result:
                self.fail(here, f"{address} is listed twice")
                continue
            result.append(address)
        return tuple(result) if self.clean_since(mark) else None

    def cidr(self, value: object, path: str) -> IPNetwork | None:
        """A strict CIDR: host bits set are an error, not masked."""
        text = self.string(value, path, "a CIDR string")
        if text is None:
            return None
        network = cidr_problem(text)
        if isinstance(network, str):
            self.fail(path, network)
            return None
        return network

    def cidrs(
        self,
        value: object,
        path: str,
        *,
        non_empty: bool = False,
        seen: dict[IPNetwork, str] | None = None,
        what: str = "CIDR",
    ) -> tuple[IPNetwork, ...] | None:
        """A list of CIDRs, each listed once; ``seen`` (network -> path) extends the
        uniqueness check across several lists, such as the rules of one policy."""
        items = self.sequence(value, path, "CIDR strings", non_empty=non_empty)
        if items is None:
            return None
        seen = {} if seen is None else seen
        mark = self.mark()
        result: list[IPNetwork] = []
        for index, item in enumerate(items):
            here = item_path(path, index)
            network = self.cidr(item, here)
            if network is None:
                continue
            if network in seen:
                self.fail(here, f"duplicate {what} {network}: already at {seen[network]}")
                continue
            seen[network] = here
            result.append(network)
        return tuple(result) if self.clean_since(mark) else None

    # -- labels and annotations ---------------------------------------------------------------

    def label_key(self, value: object, path: str) -> str | None:
        key = self.string(value, path, "a label key string")
        if key is None:
            return None
        problem = label_key_problem(key)
        if problem:
            self.fail(path, problem)
            return None
        return key

    def selector_key(self, value: object, path: str) -> str | None:
        """A label key in a selector; in Cilium documents a ``k8s:`` or ``any:`` source
        prefix is dropped (both match the pod's Kubernetes labels here)."""
        key = self.string(value, path, "a label key string")
        if key is None:
            return None
        if self.cilium_label_sources and ":" in key.split("/", 1)[0]:
            source, _, rest = key.partition(":")
            if source not in CILIUM_LABEL_SOURCES:
                self.fail(
                    path,
                    f"label key {key!r} names the label source {source!r}: expected "
                    f"{' or '.join(repr(s + ':') for s in CILIUM_LABEL_SOURCES)}, or no source",
                )
                return None
            key = rest
        problem = label_key_problem(key)
        if problem:
            self.fail(path, problem)
            return None
        return key

    def label_value(self, value: object, path: str) -> str | None:
        text = self.string(value, path, "a label value string")
        if text is None:
            return None
        problem = label_value_problem(text)
        if problem:
            self.fail(path, problem)
            return None
        return text

    def labels(self, value: object, path: str) -> dict[str, str] | None:
        """A mapping of label keys to label values, both checked against Kubernetes' rules."""
        mapping = self.mapping(value, path, "a mapping of label keys to values")
        if mapping is None:
            return None
        mark = self.mark()
        result: dict[str, str] = {}
        for key, item in mapping.items():
            here = field_path(path, key)
            problem = label_key_problem(key)
            if problem:
                self.fail(here, problem)
            text = self.label_value(item, here)
            if text is not None and not problem:
                result[key] = text
        return result if self.clean_since(mark) else None

    def annotations(self, value: object, path: str) -> dict[str, str] | None:
        """A mapping of strings to strings; Calico's egress annotations are checked too."""
        mapping = self.mapping(value, path, "a mapping of annotation keys to string values")
        if mapping is None:
            return None
        mark = self.mark()
        result: dict[str, str] = {}
        for key, item in mapping.items():
            text = self.string(item, field_path(path, key), "an annotation value string")
            if text is not None:
                result[key] = text
        if self.clean_since(mark):
            self.check_calico_annotations(result, path)
        return result if self.clean_since(mark) else None

    def check_calico_annotations(self, annotations: Mapping[str, str], path: str) -> None:
        """Calico's selector annotations must parse; the policy annotation must name one.

        The named policy need not exist (it may be loaded later)."""
        for key in (CALICO_SELECTOR_ANNOTATION, CALICO_NAMESPACE_SELECTOR_ANNOTATION):
            text = annotations.get(key)
            if text is not None:
                self.calico_expression(text, field_path(path, key))
        policy = annotations.get(CALICO_POLICY_ANNOTATION)
        if policy is not None and not policy.strip():
            self.fail(
                field_path(path, CALICO_POLICY_ANNOTATION),
                "expected the name of an EgressGatewayPolicy, got an empty string",
            )

    # -- selectors ------------------------------------------------------------------------

    def calico_expression(self, text: str, path: str) -> Selector | None:
        try:
            return parse_calico_selector(text)
        except SelectorSyntaxError as error:
            self.fail(path, selector_syntax_message(error))
            return None

    def selector(
        self,
        value: object,
        path: str,
        *,
        allow_mapping: bool = True,
        allow_expression: bool = True,
    ) -> Selector | None:
        """A LabelSelector mapping or a Calico expression string, as the caller allows."""
        if allow_expression and isinstance(value, str):
            return self.calico_expression(value, path)
        if allow_mapping and isinstance(value, dict):
            return self.label_selector(value, path)
        if allow_mapping and allow_expression:
            what = _SELECTOR_FORMS
        elif allow_mapping:
            what = "a LabelSelector mapping (matchLabels, matchExpressions)"
        else:
            what = "a Calico selector expression string"
        self.fail(path, f"expected {what}, got {describe(value)}")
        return None

    def label_selector(self, value: object, path: str) -> Selector | None:
        """A Kubernetes LabelSelector: every ``matchLabels`` entry and every
        ``matchExpressions`` requirement must hold; ``{}`` matches everything."""
        mapping = self.mapping(value, path, "a LabelSelector mapping (matchLabels, matchExpressions)")
        if mapping is None:
            return None
        mark = self.mark()
        self.check_fields(mapping, path, ("matchLabels", "matchExpressions"))
        terms: list[Selector] = []
        if "matchLabels" in mapping:
            here = field_path(path, "matchLabels")
            labels = self.mapping(mapping["matchLabels"], here, "a mapping of label keys to values")
            for raw_key, item in (labels or {}).items():
                key = self.selector_key(raw_key, field_path(here, raw_key))
                text = self.label_value(item, field_path(here, raw_key))
                if key is not None and text is not None:
                    terms.append(LabelIn(key, frozenset((text,))))
        if "matchExpressions" in mapping:
            here = field_path(path, "matchExpressions")
            requirements = self.sequence(
                mapping["matchExpressions"], here, "label selector requirements (key, operator, values)"
            )
            for index, requirement in enumerate(requirements or ()):
                term = self.requirement(requirement, item_path(here, index))
                if term is not None:
                    terms.append(term)
        if not self.clean_since(mark):
            return None
        if not terms:
            return MATCH_ALL
        return terms[0] if len(terms) == 1 else And(tuple(terms))

    def requirement(self, value: object, path: str) -> Selector | None:
        """One ``matchExpressions`` entry."""
        mapping = self.mapping(value, path, "a label selector requirement mapping (key, operator, values)")
        if mapping is None:
            return None
        mark = self.mark()
        self.check_fields(
            mapping,
            path,
            ("key", "operator", "values"),
            {"key": "a label key", "operator": f"one of {', '.join(OPERATORS)}"},
        )
        key = self.selector_key(mapping["key"], field_path(path, "key")) if "key" in mapping else None
        operator = None
        if "operator" in mapping:
            operator = self.choice(mapping["operator"], field_path(path, "operator"), "operator", OPERATORS)
        values: list[str] = []
        values_path = field_path(path, "values")
        items: list[object] | None = []
        if "values" in mapping:
            items = self.sequence(mapping["values"], values_path, "label value strings")
            for index, item in enumerate(items or ()):
                text = self.label_value(item, item_path(values_path, index))
                if text is not None:
                    values.append(text)
        if items is not None and operator in ("In", "NotIn") and not items:
            if "values" in mapping:
                self.fail(
                    values_path, f"operator {operator} needs a non-empty list of values, got an empty list"
                )
            else:
                self.fail(
                    values_path,
                    f"required field 'values' is missing: operator {operator} needs a non-empty list",
                )
        elif items and operator in ("Exists", "DoesNotExist"):
            self.fail(
                values_path, f"operator {operator} takes no values: expected no values or an empty list"
            )
        if not self.clean_since(mark) or key is None or operator is None:
            return None
        if operator == "In":
            return LabelIn(key, frozenset(values))
        if operator == "NotIn":
            return Not(LabelIn(key, frozenset(values)))
        if operator == "Exists":
            return HasLabel(key)
        return Not(HasLabel(key))
