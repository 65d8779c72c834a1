"""Read Cilium, Calico, native and Kubernetes documents into the policy model.

Files hold YAML documents (read with ``yaml.safe_load_all``, never ``yaml.load``) or
JSON (a ``.json`` file). Every document of every file is read and every fault is
collected with its file, document and field path; ``load_files`` and ``load_texts``
then raise one :class:`~egresscore.errors.PolicyErrorGroup`, so that nothing is
compiled from a set of files with an error. docs/policy.md specifies the formats.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import yaml

from egresscore.errors import PolicyError, PolicyErrorGroup
from egresscore.policy._fields import (
    INT32_MAX,
    INT32_MIN,
    ExpansionError,
    FieldReader,
    WorkBudget,
    field_path,
    interface_problem,
    item_path,
)
from egresscore.policy.model import (
    CALICO_NAMESPACE_SELECTOR_ANNOTATION,
    CALICO_SELECTOR_ANNOTATION,
    AnnotationSelection,
    ClusterNetwork,
    Endpoint,
    GatewaySpec,
    Inventory,
    IPAddress,
    IPNetwork,
    Namespace,
    Node,
    Origin,
    Policy,
    PolicySet,
    Rule,
    RuleAction,
    SourceTerm,
)
from egresscore.policy.selector import Selector

__all__ = [
    "calico_annotation_selectors",
    "load_files",
    "load_texts",
    "parse_label_selector",
    "validate_files",
]

CILIUM_POLICY = "CiliumEgressGatewayPolicy"
CALICO_POLICY = "EgressGatewayPolicy"
NATIVE_POLICY = "EgressPolicy"

#: Every kind read, with the one apiVersion it is read under.
API_VERSIONS: dict[str, str] = {
    CILIUM_POLICY: "cilium.io/v2",
    CALICO_POLICY: "projectcalico.org/v3",
    NATIVE_POLICY: "egresscore.io/v1alpha1",
    "Inventory": "egresscore.io/v1alpha1",
    "ClusterNetwork": "egresscore.io/v1alpha1",
    "Pod": "v1",
    "Namespace": "v1",
    "Node": "v1",
    "List": "v1",
}
_KINDS_TEXT = ", ".join(f"{kind} ({api})" for kind, api in sorted(API_VERSIONS.items()))

#: Kubernetes ObjectMeta: accepted and ignored (all but the name) in the documents we
#: check strictly, so that ``kubectl get -o yaml`` output loads as it is.
OBJECT_META_FIELDS = frozenset(
    {
        "annotations",
        "clusterName",
        "creationTimestamp",
        "deletionGracePeriodSeconds",
        "deletionTimestamp",
        "finalizers",
        "generateName",
        "generation",
        "labels",
        "managedFields",
        "name",
        "namespace",
        "ownerReferences",
        "resourceVersion",
        "selfLink",
        "uid",
    }
)
_TOP_FIELDS = ("apiVersion", "kind", "metadata", "spec", "status")
_GATEWAY_PREFERENCES = ("None", "PreferNodeLocal")
_NATIVE_ACTIONS = ("redirect", "pass", "drop")
_DEFAULT_CALICO_DESTINATION: IPNetwork = ipaddress.IPv4Network("0.0.0.0/0")
# A self-referencing YAML alias can make a List contain itself; real Lists do not nest.
# kubectl prints one List; a List of Lists is already unusual.
_MAX_LIST_DEPTH = 2
# Errors reported at most per load: past this, more are noise (and cost time).
_MAX_ERRORS = 1000
# Pods that have finished keep their IP in status after the IP is given to another pod.
_FINISHED_POD_PHASES = frozenset({"Succeeded", "Failed"})

_Key = TypeVar("_Key")


def load_files(paths: Iterable[str | os.PathLike[str]]) -> PolicySet:
    """Read every document of every file in ``paths`` into one :class:`PolicySet`.

    Raises :class:`~egresscore.errors.PolicyErrorGroup` listing every error found in
    all files (a missing or unreadable file is one of them)."""
    loader = _Loader()
    for path in paths:
        loader.read_file(path)
    return loader.result()


def load_texts(texts: Iterable[tuple[str, str]]) -> PolicySet:
    """Like :func:`load_files`, for ``(source name, text)`` pairs; a source name
    ending in ``.json`` is read as JSON, any other as YAML."""
    loader = _Loader()
    for source, text in texts:
        loader.read_text(source, text)
    return loader.result()


def validate_files(paths: Iterable[str | os.PathLike[str]]) -> list[PolicyError]:
    """Every error in the files in ``paths`` (``[]`` when they load); never raises
    :class:`~egresscore.errors.PolicyError`."""
    loader = _Loader()
    for path in paths:
        loader.read_file(path)
    return loader.capped_errors()


def parse_label_selector(data: object, path: str, *, allow_expression: bool = True) -> Selector:
    """A Kubernetes ``LabelSelector`` mapping, or (unless ``allow_expression`` is false)
    a Calico selector expression string, as a selector tree.

    Raises :class:`~egresscore.errors.PolicyError` at ``path`` (a
    :class:`~egresscore.errors.PolicyErrorGroup` when there are several faults)."""
    reader = FieldReader("", "")
    selector = reader.selector(data, path, allow_expression=allow_expression)
    _raise_reader_errors(reader)
    assert selector is not None
    return selector


def calico_annotation_selectors(
    annotations: Mapping[str, str], path: str = "metadata.annotations"
) -> tuple[Selector | None, Selector | None]:
    """The gateway pod selector and namespace selector of Calico's egress annotations
    (``egress.projectcalico.org/selector`` and ``.../namespaceSelector``).

    An absent annotation gives ``None``. An empty selector is ``all()``; an empty
    namespace selector is ``None``, as Calico reads it: the pod's own namespace.
    Raises :class:`~egresscore.errors.PolicyError` at ``path["<annotation>"]`` for an
    expression that does not parse (the loader has already reported those)."""
    reader = FieldReader("", "")
    selector_text = annotations.get(CALICO_SELECTOR_ANNOTATION)
    namespace_text = annotations.get(CALICO_NAMESPACE_SELECTOR_ANNOTATION)
    selectors: list[Selector | None] = [None, None]
    if selector_text is not None:
        selectors[0] = reader.calico_expression(selector_text, field_path(path, CALICO_SELECTOR_ANNOTATION))
    if namespace_text is not None and namespace_text.strip():
        namespace_path = field_path(path, CALICO_NAMESPACE_SELECTOR_ANNOTATION)
        selectors[1] = reader.calico_expression(namespace_text, namespace_path)
    _raise_reader_errors(reader)
    return selectors[0], selectors[1]


def _raise_reader_errors(reader: FieldReader) -> None:
    if len(reader.errors) == 1:
        raise reader.errors[0]
    if reader.errors:
        raise PolicyErrorGroup(reader.errors)


def _describe_document(number: int, data: object) -> str:
    """``document 2 (CiliumEgressGatewayPolicy egress-sample)``, with what can be read."""
    label = f"document {number}"
    if not isinstance(data, dict):
        return label
    kind = data.get("kind")
    if not isinstance(kind, str) or not kind:
        return label
    metadata = data.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return f"{label} ({kind} {name})" if isinstance(name, str) and name else f"{label} ({kind})"


def _yaml_error_message(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        message = f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
        if error.context:
            context_mark = error.context_mark
            at = f" at line {context_mark.line + 1}, column {context_mark.column + 1}" if context_mark else ""
            message += f" ({error.context}{at})"
        if error.problem and "constructor for the tag" in error.problem:
            message += "; only plain YAML is read: tags such as !!python/object are refused"
        return message
    return f"invalid YAML: {error}"


class _Loader:
    """Reads documents one after the other into one policy set, collecting errors."""

    def __init__(self) -> None:
        self.errors: list[PolicyError] = []
        self.policies: list[Policy] = []
        self.namespaces: list[Namespace] = []
        self.nodes: list[Node] = []
        self.endpoints: list[Endpoint] = []
        self.network: ClusterNetwork | None = None
        # Where each name was first defined, to name it when a second definition comes.
        self._policy_sites: dict[tuple[str, str], str] = {}
        self._namespace_sites: dict[str, str] = {}
        self._node_sites: dict[str, str] = {}
        self._endpoint_sites: dict[str, str] = {}
        self._ip_sites: dict[IPAddress, str] = {}
        # Files abandoned part way (ExpansionError): reported past the error cap.
        self.fatal: list[PolicyError] = []
        self._network_site = ""

    def capped_errors(self) -> list[PolicyError]:
        """The errors, at most _MAX_ERRORS of them, then one saying that there are more
        (reading stops soon after the limit, so how many more is not known)."""
        errors = list(self.errors)
        if len(errors) > _MAX_ERRORS:
            errors[_MAX_ERRORS:] = [
                PolicyError(
                    f"further errors not reported (at most {_MAX_ERRORS} are)",
                    source=errors[_MAX_ERRORS].source,
                )
            ]
        # Why a file was abandoned is always reported, whatever came before it.
        return errors + self.fatal

    def result(self) -> PolicySet:
        if self.errors or self.fatal:
            raise PolicyErrorGroup(self.capped_errors())
        inventory = Inventory(
            namespaces=tuple(self.namespaces),
            nodes=tuple(self.nodes),
            endpoints=tuple(self.endpoints),
            network=self.network if self.network is not None else ClusterNetwork(),
        )
        return PolicySet(policies=tuple(self.policies), inventory=inventory)

    # -- files and documents ------------------------------------------------------------

    def read_file(self, path: str | os.PathLike[str]) -> None:
        source = os.fspath(path)
        try:
            data = Path(source).read_bytes()
        except OSError as error:
            self.errors.append(PolicyError(f"cannot read the file: {error.strerror or error}", source=source))
            return
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            line = data.count(b"\n", 0, error.start) + 1
            message = f"the file is not UTF-8 text: {error.reason} at line {line} (byte {error.start})"
            self.errors.append(PolicyError(message, source=source))
            return
        self.read_text(source, text)

    def read_text(self, source: str, text: str) -> None:
        if source.lower().endswith(".json"):
            self._read_json(source, text)
            return
        number = 0
        budget = WorkBudget(len(text))
        try:
            for number, data in enumerate(yaml.safe_load_all(text), start=1):
                if len(self.errors) > _MAX_ERRORS:
                    return
                self.read_document(source, number, data, budget)
        except ExpansionError as error:
            self.fatal.append(PolicyError(str(error), source=source, document=f"document {number}"))
        except yaml.YAMLError as error:
            self.errors.append(
                PolicyError(_yaml_error_message(error), source=source, document=f"document {number + 1}")
            )
        except RecursionError:
            self.errors.append(
                PolicyError(
                    "invalid YAML: nested too deeply", source=source, document=f"document {number + 1}"
                )
            )

    def _read_json(self, source: str, text: str) -> None:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            message = f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
            self.errors.append(PolicyError(message, source=source, document="document 1"))
            return
        except RecursionError:
            self.errors.append(
                PolicyError("invalid JSON: nested too deeply", source=source, document="document 1")
            )
            return
        try:
            # JSON has no aliases: every value is written out, so its size bounds the work.
            self.read_document(source, 1, data, WorkBudget(len(text) * 2))
        except ExpansionError as error:
            self.fatal.append(PolicyError(str(error), source=source, document="document 1"))

    def read_document(self, source: str, number: int, data: object, budget: WorkBudget) -> None:
        if data is None:  # an empty document, as between two '---' lines
            return
        reader = FieldReader(source, _describe_document(number, data), budget)
        try:
            self._read_object(reader, data, "", 0)
        finally:
            self.errors.extend(reader.errors)

    def _read_object(self, r: FieldReader, data: object, base: str, depth: int) -> None:
        mapping = r.mapping(data, base, "an object mapping with apiVersion and kind")
        if mapping is None:
            return
        kind_path, api_path = field_path(base, "kind"), field_path(base, "apiVersion")
        if "kind" not in mapping:
            r.fail(kind_path, f"required field 'kind' is missing: expected one of {_KINDS_TEXT}")
            return
        kind = r.string(mapping["kind"], kind_path, "a kind name")
        if kind is None:
            return
        expected_api = API_VERSIONS.get(kind)
        if expected_api is None:
            r.fail(kind_path, f"unsupported kind {kind!r}: expected one of {_KINDS_TEXT}")
            return
        if "apiVersion" not in mapping:
            r.fail(
                api_path, f"required field 'apiVersion' is missing: expected {expected_api} for kind {kind}"
            )
            return
        api = r.string(mapping["apiVersion"], api_path, "an apiVersion string")
        if api is None:
            return
        if api != expected_api:
            r.fail(api_path, f"unsupported apiVersion {api!r} for kind {kind}: expected {expected_api}")
            return
        if kind == CILIUM_POLICY:
            self._read_cilium_policy(r, mapping, base)
        elif kind == CALICO_POLICY:
            self._read_calico_policy(r, mapping, base)
        elif kind == NATIVE_POLICY:
            self._read_native_policy(r, mapping, base)
        elif kind == "Inventory":
            self._read_inventory(r, mapping, base)
        elif kind == "ClusterNetwork":
            self._read_cluster_network(r, mapping, base)
        elif kind == "Pod":
            self._read_pod(r, mapping, base)
        elif kind == "Node":
            self._read_node(r, mapping, base)
        elif kind == "Namespace":
            self._read_namespace(r, mapping, base)
        else:
            self._read_list(r, mapping, base, depth)

    # -- shared parts ------------------------------------------------------------------------

    def _claim(
        self, r: FieldReader, sites: dict[_Key, str], key: _Key, what: str, path: str, site: str
    ) -> bool:
        """Record that ``key`` is defined at ``site``, or report that it already was."""
        first = sites.get(key)
        if first is not None:
            r.fail(path, f"duplicate {what}: first defined at {first}")
            return False
        sites[key] = r.where(site)
        return True

    def _claim_ips(self, r: FieldReader, ips: tuple[IPAddress, ...], paths: list[str], key: str) -> bool:
        clean = True
        for address, path in zip(ips, paths, strict=True):
            first = self._ip_sites.get(address)
            if first is not None:
                r.fail(path, f"{address} is already the IP of {first}: an IP belongs to at most one endpoint")
                clean = False
        if clean:
            for address, path in zip(ips, paths, strict=True):
                self._ip_sites[address] = f"endpoint {key!r} ({r.where(path)})"
        return clean

    def _strict_metadata(
        self, r: FieldReader, mapping: Mapping[str, object], base: str, *, required: bool
    ) -> str | None:
        """The name in ``metadata``; other standard ObjectMeta fields are ignored."""
        path = field_path(base, "metadata")
        if "metadata" not in mapping:
            if required:
                r.fail(path, "required field 'metadata' is missing: expected a mapping with a name")
            return None
        metadata = r.mapping(mapping["metadata"], path, "a metadata mapping")
        if metadata is None:
            return None
        r.check_fields(metadata, path, OBJECT_META_FIELDS, {"name": "a non-empty name"} if required else None)
        return r.name(metadata["name"], field_path(path, "name")) if "name" in metadata else None

    def _spec(self, r: FieldReader, mapping: Mapping[str, object], base: str) -> dict[str, object] | None:
        r.check_fields(mapping, base, _TOP_FIELDS, {"spec": "a spec mapping"})
        if "spec" not in mapping:
            return None
        return r.mapping(mapping["spec"], field_path(base, "spec"), "a spec mapping")

    def _claim_policy(self, r: FieldReader, kind: str, name: str | None, base: str) -> None:
        if name is not None:
            metadata_name = field_path(field_path(base, "metadata"), "name")
            self._claim(r, self._policy_sites, (kind, name), f"{kind} {name!r}", metadata_name, base)

    def _source_terms(
        self, r: FieldReader, spec: Mapping[str, object], spec_path: str, *, cilium: bool = False
    ) -> tuple[SourceTerm, ...] | None:
        if "selectors" not in spec:
            return None
        path = field_path(spec_path, "selectors")
        items = r.sequence(
            spec["selectors"],
            path,
            "selectors (podSelector, namespaceSelector, nodeSelector)",
            non_empty=True,
        )
        if items is None:
            return None
        mark = r.mark()
        terms: list[SourceTerm] = []
        for index, item in enumerate(items):
            here = item_path(path, index)
            entry = r.mapping(item, here, "a selector mapping (podSelector, namespaceSelector, nodeSelector)")
            if entry is None:
                continue
            r.check_fields(entry, here, ("namespaceSelector", "nodeSelector", "podSelector"))
            if cilium and "podSelector" not in entry and "namespaceSelector" not in entry:
                # Cilium refuses such an entry (ParseCEGP: "cannot have both nil namespace
                # selector and nil pod selector"); reading it as "every pod" would redirect
                # pods Cilium never would.
                r.fail(
                    here,
                    "expected a podSelector or a namespaceSelector (Cilium rejects an entry with neither)",
                )
                continue
            parts: dict[str, Selector | None] = {}
            for key in ("podSelector", "namespaceSelector", "nodeSelector"):
                parts[key] = r.selector(entry[key], field_path(here, key)) if key in entry else None
            terms.append(
                SourceTerm(parts["podSelector"], parts["namespaceSelector"], parts["nodeSelector"], here)
            )
        return tuple(terms) if r.clean_since(mark) else None

    def _optional_cidrs(
        self, r: FieldReader, spec: Mapping[str, object], key: str, spec_path: str
    ) -> tuple[IPNetwork, ...] | None:
        if key not in spec:
            return ()
        return r.cidrs(spec[key], field_path(spec_path, key), what="CIDR")

    def _prefers_node_local(self, r: FieldReader, rule: Mapping[str, object], path: str) -> bool:
        """A rule's ``gatewayPreference``: ``PreferNodeLocal`` or ``None`` (the default)."""
        if "gatewayPreference" not in rule:
            return False
        preference_path = field_path(path, "gatewayPreference")
        preference = r.choice(
            rule["gatewayPreference"], preference_path, "gatewayPreference", _GATEWAY_PREFERENCES
        )
        return preference == "PreferNodeLocal"

    # -- policies -------------------------------------------------------------------------------

    def _read_cilium_policy(self, r: FieldReader, mapping: Mapping[str, object], base: str) -> None:
        r.cilium_label_sources = True
        mark = r.mark()
        name = self._strict_metadata(r, mapping, base, required=True)
        self._claim_policy(r, CILIUM_POLICY, name, base)
        spec = self._spec(r, mapping, base)
        if spec is None:
            return
        spec_path = field_path(base, "spec")
        r.check_fields(
            spec,
            spec_path,
            ("destinationCIDRs", "egressGateway", "egressGateways", "excludedCIDRs", "selectors"),
            {
                "selectors": "a non-empty list of selectors",
                "destinationCIDRs": "a non-empty list of CIDR strings",
            },
        )
        selection = self._source_terms(r, spec, spec_path, cilium=True)
        destinations_path = field_path(spec_path, "destinationCIDRs")
        destinations = None
        if "destinationCIDRs" in spec:
            destinations = r.cidrs(
                spec["destinationCIDRs"], destinations_path, non_empty=True, what="destination"
            )
        excluded = self._optional_cidrs(r, spec, "excludedCIDRs", spec_path)
        gateways = self._cilium_gateways(r, spec, spec_path)
        if (
            not r.clean_since(mark)
            or name is None
            or selection is None
            or destinations is None
            or excluded is None
            or gateways is None
        ):
            return
        rule = Rule(destinations, RuleAction.REDIRECT, gateways, path=destinations_path)
        origin = Origin(r.source, r.document, CILIUM_POLICY, name)
        excluded_path = field_path(spec_path, "excludedCIDRs")
        self.policies.append(Policy(name, selection, (rule,), excluded, 0, origin, excluded_path))

    def _cilium_gateways(
        self, r: FieldReader, spec: Mapping[str, object], spec_path: str
    ) -> tuple[GatewaySpec, ...] | None:
        one_path = field_path(spec_path, "egressGateway")
        many_path = field_path(spec_path, "egressGateways")
        if "egressGateway" in spec and "egressGateways" in spec:
            r.fail(many_path, "set either egressGateway or egressGateways, not both")
            return None
        if "egressGateway" in spec:
            gateway = self._cilium_gateway(r, spec["egressGateway"], one_path)
            return None if gateway is None else (gateway,)
        if "egressGateways" not in spec:
            r.fail(
                one_path,
                "required field 'egressGateway' is missing: expected egressGateway (one gateway) "
                "or egressGateways (a list of gateways)",
            )
            return None
        items = r.sequence(
            spec["egressGateways"],
            many_path,
            "gateways (nodeSelector, egressIP or interface)",
            non_empty=True,
        )
        if items is None:
            return None
        gateways = [
            self._cilium_gateway(r, item, item_path(many_path, index)) for index, item in enumerate(items)
        ]
        return tuple(g for g in gateways if g is not None) if None not in gateways else None

    def _cilium_gateway(self, r: FieldReader, value: object, path: str) -> GatewaySpec | None:
        gateway = r.mapping(value, path, "a gateway mapping (nodeSelector, egressIP or interface)")
        if gateway is None:
            return None
        mark = r.mark()
        r.check_fields(
            gateway, path, ("egressIP", "interface", "nodeSelector"), {"nodeSelector": "a node selector"}
        )
        node_selector = None
        if "nodeSelector" in gateway:
            node_selector = r.selector(gateway["nodeSelector"], field_path(path, "nodeSelector"))
        if "egressIP" in gateway and "interface" in gateway:
            r.fail(field_path(path, "interface"), "set at most one of egressIP and interface")
        egress_ip = r.ip(gateway["egressIP"], field_path(path, "egressIP")) if "egressIP" in gateway else None
        interface = (
            r.interface(gateway["interface"], field_path(path, "interface"))
            if "interface" in gateway
            else None
        )
        if not r.clean_since(mark):
            return None
        return GatewaySpec(
            path=path,
            node_selector=node_selector,
            first_node_only=True,
            egress_ips=(egress_ip,) if egress_ip is not None else (),
            interface=interface,
        )

    def _read_calico_policy(self, r: FieldReader, mapping: Mapping[str, object], base: str) -> None:
        mark = r.mark()
        name = self._strict_metadata(r, mapping, base, required=True)
        self._claim_policy(r, CALICO_POLICY, name, base)
        spec = self._spec(r, mapping, base)
        if spec is None:
            return
        spec_path = field_path(base, "spec")
        r.check_fields(spec, spec_path, ("rules",), {"rules": "a non-empty list of rules"})
        if "rules" not in spec:
            return
        rules_path = field_path(spec_path, "rules")
        items = r.sequence(
            spec["rules"],
            rules_path,
            "rules (destination, gateway, gatewayPreference, description)",
            non_empty=True,
        )
        seen: dict[IPNetwork, str] = {}
        rules = [
            self._calico_rule(r, item, item_path(rules_path, index), seen)
            for index, item in enumerate(items or ())
        ]
        if not r.clean_since(mark) or name is None:
            return
        origin = Origin(r.source, r.document, CALICO_POLICY, name)
        selection = AnnotationSelection(name)
        checked = tuple(rule for rule in rules if rule is not None)
        self.policies.append(
            Policy(name, selection, checked, (), 0, origin, field_path(spec_path, "excludedCIDRs"))
        )

    def _calico_rule(
        self, r: FieldReader, value: object, path: str, seen: dict[IPNetwork, str]
    ) -> Rule | None:
        rule = r.mapping(value, path, "a rule mapping (destination, gateway, gatewayPreference, description)")
        if rule is None:
            return None
        mark = r.mark()
        r.check_fields(rule, path, ("description", "destination", "gateway", "gatewayPreference"))
        destination: IPNetwork | None = _DEFAULT_CALICO_DESTINATION
        destination_path = path
        if "destination" in rule:
            here = field_path(path, "destination")
            target = r.mapping(rule["destination"], here, "a destination mapping (cidr)")
            destination = None
            if target is not None:
                r.check_fields(target, here, ("cidr",), {"cidr": "a CIDR string"})
                if "cidr" in target:
                    destination_path = field_path(here, "cidr")
                    destination = r.cidr(target["cidr"], destination_path)
        if destination is not None:
            if destination in seen:
                r.fail(
                    destination_path,
                    f"duplicate destination {destination}: {seen[destination]} has it already; "
                    "two rules cannot have the same destination",
                )
            else:
                seen[destination] = path
        description = ""
        if "description" in rule:
            description = r.string(rule["description"], field_path(path, "description")) or ""
        prefer_node_local = self._prefers_node_local(r, rule, path)
        gateways: tuple[GatewaySpec, ...] = ()
        max_gateways = 0
        if "gateway" in rule:
            here = field_path(path, "gateway")
            gateway = r.mapping(
                rule["gateway"], here, "a gateway mapping (selector, namespaceSelector, maxNextHops)"
            )
            if gateway is not None:
                r.check_fields(
                    gateway,
                    here,
                    ("maxNextHops", "namespaceSelector", "selector"),
                    {"selector": "a Calico selector expression for the gateway pods"},
                )
                pods = None
                if "selector" in gateway:
                    pods = r.selector(gateway["selector"], field_path(here, "selector"), allow_mapping=False)
                namespaces = None
                raw = gateway.get("namespaceSelector")
                # Calico's API cannot tell an empty namespaceSelector from a missing one:
                # both mean the client pod's own namespace.
                if "namespaceSelector" in gateway and not (isinstance(raw, str) and not raw.strip()):
                    namespaces = r.selector(raw, field_path(here, "namespaceSelector"), allow_mapping=False)
                if "maxNextHops" in gateway:
                    max_gateways = (
                        r.integer(gateway["maxNextHops"], field_path(here, "maxNextHops"), 0, INT32_MAX) or 0
                    )
                gateways = (GatewaySpec(path=here, pod_selector=pods, namespace_selector=namespaces),)
        if not r.clean_since(mark) or destination is None:
            return None
        return Rule(
            destinations=(destination,),
            action=RuleAction.REDIRECT if gateways else RuleAction.PASS,
            gateways=gateways,
            prefer_node_local=prefer_node_local,
            max_gateways=max_gateways,
            path=path,
            description=description,
        )

    def _read_native_policy(self, r: FieldReader, mapping: Mapping[str, object], base: str) -> None:
        mark = r.mark()
        name = self._strict_metadata(r, mapping, base, required=True)
        self._claim_policy(r, NATIVE_POLICY, name, base)
        spec = self._spec(r, mapping, base)
        if spec is None:
            return
        spec_path = field_path(base, "spec")
        r.check_fields(
            spec,
            spec_path,
            ("excludedCIDRs", "priority", "rules", "selectors"),
            {"selectors": "a non-empty list of selectors", "rules": "a non-empty list of rules"},
        )
        priority = 0
        if "priority" in spec:
            priority = (
                r.integer(spec["priority"], field_path(spec_path, "priority"), INT32_MIN, INT32_MAX) or 0
            )
        selection = self._source_terms(r, spec, spec_path)
        excluded = self._optional_cidrs(r, spec, "excludedCIDRs", spec_path)
        rules: list[Rule | None] = []
        if "rules" in spec:
            rules_path = field_path(spec_path, "rules")
            items = r.sequence(
                spec["rules"], rules_path, "rules (destinationCIDRs, action, ...)", non_empty=True
            )
            seen: dict[IPNetwork, str] = {}
            for index, item in enumerate(items or ()):
                rules.append(self._native_rule(r, item, item_path(rules_path, index), seen))
        if not r.clean_since(mark) or name is None or selection is None or excluded is None:
            return
        origin = Origin(r.source, r.document, NATIVE_POLICY, name)
        checked = tuple(rule for rule in rules if rule is not None)
        excluded_path = field_path(spec_path, "excludedCIDRs")
        self.policies.append(Policy(name, selection, checked, excluded, priority, origin, excluded_path))

    def _native_rule(
        self, r: FieldReader, value: object, path: str, seen: dict[IPNetwork, str]
    ) -> Rule | None:
        rule = r.mapping(value, path, "a rule mapping (destinationCIDRs, action, egressGateways, ...)")
        if rule is None:
            return None
        mark = r.mark()
        r.check_fields(
            rule,
            path,
            (
                "action",
                "description",
                "destinationCIDRs",
                "egressGateways",
                "gatewayPreference",
                "maxGateways",
            ),
            {"destinationCIDRs": "a non-empty list of CIDR strings"},
        )
        destinations = None
        if "destinationCIDRs" in rule:
            destinations = r.cidrs(
                rule["destinationCIDRs"],
                field_path(path, "destinationCIDRs"),
                non_empty=True,
                seen=seen,
                what="destination",
            )
        action: RuleAction | None = RuleAction.REDIRECT
        if "action" in rule:
            text = r.choice(rule["action"], field_path(path, "action"), "action", _NATIVE_ACTIONS)
            action = RuleAction(text) if text is not None else None
        if action is RuleAction.REDIRECT and "egressGateways" not in rule:
            r.fail(
                field_path(path, "egressGateways"),
                "required field 'egressGateways' is missing: expected a non-empty list of gateways "
                "for a redirect rule",
            )
        if action is RuleAction.PASS or action is RuleAction.DROP:
            for key in ("egressGateways", "gatewayPreference", "maxGateways"):
                if key in rule:
                    r.fail(
                        field_path(path, key),
                        f"a {action.value} rule takes no {key}: only redirect rules have gateways",
                    )
        gateways: list[GatewaySpec | None] = []
        if "egressGateways" in rule and action is RuleAction.REDIRECT:
            gateways_path = field_path(path, "egressGateways")
            items = r.sequence(rule["egressGateways"], gateways_path, "gateways", non_empty=True)
            for index, item in enumerate(items or ()):
                gateways.append(self._native_gateway(r, item, item_path(gateways_path, index)))
        prefer_node_local = action is RuleAction.REDIRECT and self._prefers_node_local(r, rule, path)
        max_gateways = 0
        if "maxGateways" in rule and action is RuleAction.REDIRECT:
            max_gateways = r.integer(rule["maxGateways"], field_path(path, "maxGateways"), 0, INT32_MAX) or 0
        description = ""
        if "description" in rule:
            description = r.string(rule["description"], field_path(path, "description")) or ""
        if not r.clean_since(mark) or destinations is None or action is None:
            return None
        return Rule(
            destinations=destinations,
            action=action,
            gateways=tuple(g for g in gateways if g is not None),
            prefer_node_local=prefer_node_local,
            max_gateways=max_gateways,
            path=path,
            description=description,
        )

    def _native_gateway(self, r: FieldReader, value: object, path: str) -> GatewaySpec | None:
        gateway = r.mapping(
            value, path, "a gateway mapping (nodeSelector with egressIPs or interface, or podSelector)"
        )
        if gateway is None:
            return None
        mark = r.mark()
        r.check_fields(
            gateway, path, ("egressIPs", "interface", "namespaceSelector", "nodeSelector", "podSelector")
        )
        for_nodes, for_pods = "nodeSelector" in gateway, "podSelector" in gateway
        if for_nodes and for_pods:
            r.fail(
                field_path(path, "podSelector"),
                "set either nodeSelector (node gateways) or podSelector (gateway pods), not both",
            )
        elif not for_nodes and not for_pods:
            r.fail(path, "a gateway needs nodeSelector (node gateways) or podSelector (gateway pods)")
        nodes = r.selector(gateway["nodeSelector"], field_path(path, "nodeSelector")) if for_nodes else None
        pods = r.selector(gateway["podSelector"], field_path(path, "podSelector")) if for_pods else None
        namespaces = None
        if "namespaceSelector" in gateway:
            here = field_path(path, "namespaceSelector")
            if for_pods:
                namespaces = r.selector(gateway["namespaceSelector"], here)
            elif for_nodes:
                r.fail(
                    here, "namespaceSelector is only for gateway pods (podSelector), not for node gateways"
                )
        egress_ips: tuple[IPAddress, ...] | None = ()
        interface = None
        for key in ("egressIPs", "interface"):
            if key in gateway and for_pods and not for_nodes:
                r.fail(
                    field_path(path, key), f"{key} is only for node gateways: gateway pods use their own IPs"
                )
        if "egressIPs" in gateway and "interface" in gateway and for_nodes:
            r.fail(field_path(path, "interface"), "set at most one of egressIPs and interface")
        elif for_nodes and not for_pods:
            if "egressIPs" in gateway:
                egress_ips = r.ips(gateway["egressIPs"], field_path(path, "egressIPs"), one_per_family=True)
            if "interface" in gateway:
                interface = r.interface(gateway["interface"], field_path(path, "interface"))
        if not r.clean_since(mark) or egress_ips is None:
            return None
        return GatewaySpec(
            path=path,
            node_selector=nodes,
            egress_ips=egress_ips,
            interface=interface,
            pod_selector=pods,
            namespace_selector=namespaces,
        )

    # -- inventory -----------------------------------------------------------------------------

    def _read_inventory(self, r: FieldReader, mapping: Mapping[str, object], base: str) -> None:
        name = self._strict_metadata(r, mapping, base, required=False)
        spec = self._spec(r, mapping, base)
        if spec is None:
            return
        spec_path = field_path(base, "spec")
        r.check_fields(spec, spec_path, ("endpoints", "namespaces", "nodes"))
        origin = Origin(r.source, r.document, "Inventory", name or "")
        for key, read_entry in (
            ("namespaces", self._inventory_namespace),
            ("nodes", self._inventory_node),
            ("endpoints", self._inventory_endpoint),
        ):
            if key in spec:
                path = field_path(spec_path, key)
                items = r.sequence(spec[key], path, f"{key} mappings")
                for index, item in enumerate(items or ()):
                    read_entry(r, item, item_path(path, index), origin)

    def _inventory_namespace(self, r: FieldReader, value: object, path: str, origin: Origin) -> None:
        entry = r.mapping(value, path, "a namespace mapping (name, labels, annotations)")
        if entry is None:
            return
        mark = r.mark()
        r.check_fields(entry, path, ("annotations", "labels", "name"), {"name": "a namespace name"})
        name = (
            r.name(entry["name"], field_path(path, "name"), "a namespace name") if "name" in entry else None
        )
        if name is not None:
            self._claim(r, self._namespace_sites, name, f"namespace {name!r}", field_path(path, "name"), path)
        labels = r.labels(entry["labels"], field_path(path, "labels")) if "labels" in entry else {}
        annotations = (
            r.annotations(entry["annotations"], field_path(path, "annotations"))
            if "annotations" in entry
            else {}
        )
        if r.clean_since(mark) and name is not None and labels is not None and annotations is not None:
            self.namespaces.append(Namespace(name, labels, annotations, origin))

    def _inventory_node(self, r: FieldReader, value: object, path: str, origin: Origin) -> None:
        entry = r.mapping(value, path, "a node mapping (name, labels, addresses, interfaces)")
        if entry is None:
            return
        mark = r.mark()
        r.check_fields(entry, path, ("addresses", "interfaces", "labels", "name"), {"name": "a node name"})
        name = r.name(entry["name"], field_path(path, "name"), "a node name") if "name" in entry else None
        if name is not None:
            self._claim(r, self._node_sites, name, f"node {name!r}", field_path(path, "name"), path)
        labels = r.labels(entry["labels"], field_path(path, "labels")) if "labels" in entry else {}
        addresses = r.ips(entry["addresses"], field_path(path, "addresses")) if "addresses" in entry else ()
        interfaces: dict[str, tuple[IPAddress, ...]] = {}
        if "interfaces" in entry:
            here = field_path(path, "interfaces")
            table = r.mapping(
                entry["interfaces"], here, "a mapping of interface names to lists of IP addresses"
            )
            for interface, items in (table or {}).items():
                interface_path = field_path(here, interface)
                problem = interface_problem(interface)
                if problem:
                    r.fail(interface_path, problem)
                interface_ips = r.ips(items, interface_path)
                if interface_ips is not None:
                    interfaces[interface] = interface_ips
        if r.clean_since(mark) and name is not None and labels is not None and addresses is not None:
            self.nodes.append(Node(name, labels, addresses, interfaces, origin))

    def _inventory_endpoint(self, r: FieldReader, value: object, path: str, origin: Origin) -> None:
        entry = r.mapping(
            value, path, "an endpoint mapping (name, namespace, node, ips, labels, annotations)"
        )
        if entry is None:
            return
        mark = r.mark()
        r.check_fields(
            entry,
            path,
            ("annotations", "ips", "labels", "name", "namespace", "node"),
            {"name": "an endpoint name", "node": "a node name", "ips": "a list of IP addresses"},
        )
        name = (
            r.name(entry["name"], field_path(path, "name"), "an endpoint name") if "name" in entry else None
        )
        namespace: str | None = "default"
        if "namespace" in entry:
            namespace = r.name(entry["namespace"], field_path(path, "namespace"), "a namespace name")
        node = r.name(entry["node"], field_path(path, "node"), "a node name") if "node" in entry else None
        ips_path = field_path(path, "ips")
        ips = r.ips(entry["ips"], ips_path, non_empty=True, one_per_family=True) if "ips" in entry else None
        labels = r.labels(entry["labels"], field_path(path, "labels")) if "labels" in entry else {}
        annotations = (
            r.annotations(entry["annotations"], field_path(path, "annotations"))
            if "annotations" in entry
            else {}
        )
        if name is None or namespace is None:
            return
        key = f"{namespace}/{name}"
        if not self._claim(r, self._endpoint_sites, key, f"endpoint {key!r}", field_path(path, "name"), path):
            return
        if ips is None or not self._claim_ips(r, ips, [item_path(ips_path, i) for i in range(len(ips))], key):
            return
        if r.clean_since(mark) and node is not None and labels is not None and annotations is not None:
            self.endpoints.append(Endpoint(name, namespace, node, ips, labels, annotations, origin))

    def _read_cluster_network(self, r: FieldReader, mapping: Mapping[str, object], base: str) -> None:
        mark = r.mark()
        name = self._strict_metadata(r, mapping, base, required=False)
        if self._network_site:
            r.fail(
                base, f"a second ClusterNetwork: the first is at {self._network_site}; expected at most one"
            )
        else:
            self._network_site = r.where(base)
        spec = self._spec(r, mapping, base)
        if spec is None:
            return
        spec_path = field_path(base, "spec")
        fields = ("internalCIDRs", "podCIDRs", "serviceCIDRs")
        r.check_fields(spec, spec_path, fields)
        pods, services, internal = (
            self._optional_cidrs(r, spec, key, spec_path)
            for key in ("podCIDRs", "serviceCIDRs", "internalCIDRs")
        )
        if not r.clean_since(mark) or pods is None or services is None or internal is None:
            return
        origin = Origin(r.source, r.document, "ClusterNetwork", name or "")
        self.network = ClusterNetwork(pods, services, internal, origin)

    # -- Kubernetes v1 objects: read for the fields we need, the rest ignored -------------------

    def _k8s_metadata(
        self, r: FieldReader, mapping: Mapping[str, object], base: str
    ) -> tuple[str, str, dict[str, str], dict[str, str]] | None:
        """``(name, namespace, labels, annotations)``; ``None`` after an error. A null
        field counts as absent, as in Kubernetes' own decoding."""
        path = field_path(base, "metadata")
        if mapping.get("metadata") is None:
            r.fail(path, "required field 'metadata' is missing: expected a mapping with a name")
            return None
        metadata = r.mapping(mapping["metadata"], path, "a metadata mapping")
        if metadata is None:
            return None
        mark = r.mark()
        name = None
        if metadata.get("name") is None:
            r.fail(field_path(path, "name"), "required field 'name' is missing: expected a non-empty name")
        else:
            name = r.name(metadata["name"], field_path(path, "name"))
        namespace: str | None = "default"
        if metadata.get("namespace") is not None:
            namespace = r.name(metadata["namespace"], field_path(path, "namespace"), "a namespace name")
        labels: dict[str, str] | None = {}
        if metadata.get("labels") is not None:
            labels = r.labels(metadata["labels"], field_path(path, "labels"))
        annotations: dict[str, str] | None = {}
        if metadata.get("annotations") is not None:
            annotations = r.annotations(metadata["annotations"], field_path(path, "annotations"))
        if (
            not r.clean_since(mark)
            or name is None
            or namespace is None
            or labels is None
            or annotations is None
        ):
            return None
        return name, namespace, labels, annotations

    def _k8s_part(
        self, r: FieldReader, mapping: Mapping[str, object], key: str, base: str
    ) -> dict[str, object]:
        """``spec`` or ``status`` of a Kubernetes object (empty when absent or null)."""
        if mapping.get(key) is None:
            return {}
        return r.mapping(mapping[key], field_path(base, key), f"a {key} mapping") or {}

    def _read_pod(self, r: FieldReader, mapping: Mapping[str, object], base: str) -> None:
        mark = r.mark()
        metadata = self._k8s_metadata(r, mapping, base)
        spec_path, status_path = field_path(base, "spec"), field_path(base, "status")
        spec = self._k8s_part(r, mapping, "spec", base)
        status = self._k8s_part(r, mapping, "status", base)
        node = ""
        if spec.get("nodeName") is not None:
            node = r.string(spec["nodeName"], field_path(spec_path, "nodeName"), "a node name") or ""
        host_network = False
        if spec.get("hostNetwork") is not None:
            host_network = bool(r.boolean(spec["hostNetwork"], field_path(spec_path, "hostNetwork")))
        phase = None
        if status.get("phase") is not None:
            phase = r.string(status["phase"], field_path(status_path, "phase"), "a pod phase")
        ips: list[IPAddress] = []
        paths: list[str] = []
        if status.get("podIPs") is not None:
            pod_ips_path = field_path(status_path, "podIPs")
            items = r.sequence(status["podIPs"], pod_ips_path, "mappings with an ip")
            for index, item in enumerate(items or ()):
                here = item_path(pod_ips_path, index)
                entry = r.mapping(item, here, "a mapping with an ip")
                if entry is not None:
                    address = r.ip(entry.get("ip"), field_path(here, "ip"))
                    if address is not None:
                        ips.append(address)
                        paths.append(field_path(here, "ip"))
        elif status.get("podIP") is not None:
            address = r.ip(status["podIP"], field_path(status_path, "podIP"))
            if address is not None:
                ips.append(address)
                paths.append(field_path(status_path, "podIP"))
        for index, address in enumerate(ips):
            for earlier in range(index):
                if ips[earlier].version == address.version:
                    r.fail(
                        paths[index],
                        f"{address} is a second IPv{address.version} address (the first is {ips[earlier]} at "
                        f"{paths[earlier]}): expected at most one address per family",
                    )
                    break
        if not r.clean_since(mark) or metadata is None:
            return
        # Pods sharing the node's network namespace cannot be redirected, pods without an
        # IP send nothing, and finished pods' IPs may already belong to new pods.
        if host_network or not ips or phase in _FINISHED_POD_PHASES:
            return
        name, namespace, labels, annotations = metadata
        key = f"{namespace}/{name}"
        name_path = field_path(field_path(base, "metadata"), "name")
        if not self._claim(r, self._endpoint_sites, key, f"endpoint {key!r}", name_path, base):
            return
        if self._claim_ips(r, tuple(ips), paths, key):
            origin = Origin(r.source, r.document, "Pod", name)
            self.endpoints.append(Endpoint(name, namespace, node, tuple(ips), labels, annotations, origin))

    def _read_node(self, r: FieldReader, mapping: Mapping[str, object], base: str) -> None:
        mark = r.mark()
        metadata = self._k8s_metadata(r, mapping, base)
        status = self._k8s_part(r, mapping, "status", base)
        addresses: list[IPAddress] = []
        if status.get("addresses") is not None:
            path = field_path(field_path(base, "status"), "addresses")
            items = r.sequence(status["addresses"], path, "mappings with a type and an address")
            for index, item in enumerate(items or ()):
                here = item_path(path, index)
                entry = r.mapping(item, here, "a mapping with a type and an address")
                if entry is None:
                    continue
                kind = r.string(entry.get("type"), field_path(here, "type"), "an address type")
                if kind in ("InternalIP", "ExternalIP"):
                    address = r.ip(entry.get("address"), field_path(here, "address"))
                    if address is not None and address not in addresses:
                        addresses.append(address)
        if not r.clean_since(mark) or metadata is None:
            return
        name, _namespace, labels, _annotations = metadata
        name_path = field_path(field_path(base, "metadata"), "name")
        if self._claim(r, self._node_sites, name, f"node {name!r}", name_path, base):
            self.nodes.append(
                Node(name, labels, tuple(addresses), {}, Origin(r.source, r.document, "Node", name))
            )

    def _read_namespace(self, r: FieldReader, mapping: Mapping[str, object], base: str) -> None:
        metadata = self._k8s_metadata(r, mapping, base)
        if metadata is None:
            return
        name, _namespace, labels, annotations = metadata
        name_path = field_path(field_path(base, "metadata"), "name")
        if self._claim(r, self._namespace_sites, name, f"namespace {name!r}", name_path, base):
            origin = Origin(r.source, r.document, "Namespace", name)
            self.namespaces.append(Namespace(name, labels, annotations, origin))

    def _read_list(self, r: FieldReader, mapping: Mapping[str, object], base: str, depth: int) -> None:
        path = field_path(base, "items")
        if depth >= _MAX_LIST_DEPTH:
            r.fail(path, f"Lists nested more than {_MAX_LIST_DEPTH} deep: expected a List of objects")
            return
        if mapping.get("items") is None:  # kubectl prints "items: []"; null is as empty
            return
        items = r.sequence(mapping["items"], path, "Kubernetes objects")
        for index, item in enumerate(items or ()):
            self._read_object(r, item, item_path(path, index), depth + 1)
