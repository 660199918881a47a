"""overlays/inference-pool: the Gateway API Inference Extension's objects, checked offline against the API
the extension publishes (its InferencePool CRD, vendored in crds/: kind, version, required fields, no
unknown field, its validation rules), and wired to what the service serves: the pool selects the server
pods on their port, its endpoint picker (llm-d's inference scheduler) is reachable where the pool says,
may read what it watches, scrapes the pods, and scores them on metrics that /metrics has."""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from test_kubernetes import container, deployment, env, exposition, objects, pod, selects

CRDS = Path(__file__).with_name("crds")
OVERLAY = "inference-pool"
# The CEL rules (x-kubernetes-validations) of the vendored CRD, evaluated here: (path, rule) -> check.
CEL_RULES = {
    ("spec.endpointPickerRef", "self.kind != 'Service' || has(self.port)"):
        lambda ref: ref.get("kind", "Service") != "Service" or "port" in ref,
    ("spec.targetPorts", "self.all(p1, self.exists_one(p2, p1.number==p2.number))"):
        lambda ports: all(sum(p2["number"] == p1["number"] for p2 in ports) == 1 for p1 in ports),
}


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the openAPIV3Schema of each served version of the vendored CRDs."""
    schemas = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            if version["served"]:
                api_version = f"{crd['spec']['group']}/{version['name']}"
                schemas[(api_version, crd["spec"]["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return schemas


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as the API server applies it to a create with field validation Strict: a field the
    schema does not know is an error (pruning would drop it silently otherwise)."""
    schema = copy.deepcopy(schema)

    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("type") == "object" and "properties" in node and path != "metadata":
            if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for name, child in node["properties"].items():
                walk(child, f"{path}.{name}".lstrip("."))
        if isinstance(node.get("items"), dict):
            walk(node["items"], path)

    walk(schema, "")
    return schema


def cel_rules(schema: dict[str, Any], path: str = "") -> list[tuple[str, str]]:
    found = [(path, v["rule"]) for v in schema.get("x-kubernetes-validations", [])]
    for name, child in schema.get("properties", {}).items():
        found += cel_rules(child, f"{path}.{name}".lstrip("."))
    if isinstance(schema.get("items"), dict):
        found += cel_rules(schema["items"], path)
    return found


def at(obj: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def api_errors(obj: dict[str, Any]) -> list[str]:
    """What the API server would refuse in `obj`, by the vendored CRD (an unknown kind is an error too)."""
    schemas = crd_schemas()
    key = (obj["apiVersion"], obj["kind"])
    if key not in schemas:
        return [f"no served CRD version for {key}: {sorted(schemas)}"]
    schema = schemas[key]
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(strict(schema)).iter_errors(obj)]
    for path, rule in cel_rules(schema):
        value = at(obj, path)
        if value is not None and not CEL_RULES[(path, rule)](value):
            errors.append(f"{path}: {rule}")
    return errors


@pytest.fixture(scope="module")
def pool(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    [found] = objects(manifests, OVERLAY, "InferencePool")
    return found


def test_the_vendored_crd_is_the_one_recorded() -> None:
    table = (CRDS / "README.md").read_text()
    for path in CRDS.glob("*.yaml"):
        assert hashlib.sha256(path.read_bytes()).hexdigest() in table, f"{path.name}: its sha256 is not in README.md"
    rules = [rule for schema in crd_schemas().values() for rule in cel_rules(schema)]
    assert rules and set(rules) <= set(CEL_RULES), "a validation rule of the CRD that this test does not evaluate"


def test_the_inference_pool_is_valid_for_the_published_api(pool: dict[str, Any]) -> None:
    assert (pool["apiVersion"], pool["kind"]) == ("inference.networking.k8s.io/v1", "InferencePool")
    assert api_errors(pool) == []


@pytest.mark.parametrize(("change", "expected"), [
    (lambda p: p["spec"].update(endpointPickRef=p["spec"].pop("endpointPickerRef")), "endpointPickRef"),
    (lambda p: p["spec"].pop("targetPorts"), "targetPorts"),
    (lambda p: p["spec"]["endpointPickerRef"].pop("port"), "has(self.port)"),
    (lambda p: p["spec"]["targetPorts"].append({"number": p["spec"]["targetPorts"][0]["number"]}), "exists_one"),
    (lambda p: p["spec"]["targetPorts"][0].update(number=70000), "70000"),
    (lambda p: p.update(apiVersion="inference.networking.x-k8s.io/v1alpha2"), "no served CRD version"),
])
def test_the_check_refuses_what_the_api_refuses(pool: dict[str, Any], change, expected: str) -> None:
    broken = copy.deepcopy(pool)
    change(broken)
    errors = api_errors(broken)
    assert any(expected in e for e in errors), errors


def test_the_pool_selects_the_server_pods_on_their_port(manifests: dict[str, list[dict[str, Any]]],
                                                        pool: dict[str, Any]) -> None:
    server = deployment(manifests, OVERLAY)
    labels = server["spec"]["template"]["metadata"]["labels"]
    assert selects(pool["spec"]["selector"], labels)
    others = [d for d in objects(manifests, OVERLAY, "Deployment") if d is not server]
    assert not any(selects(pool["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"]) for d in others)
    ports = {p["containerPort"] for p in container(pod(manifests, OVERLAY))["ports"]}
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == sorted(ports)


def test_the_endpoint_picker_serves_the_pool_where_it_says(manifests: dict[str, list[dict[str, Any]]],
                                                           pool: dict[str, Any]) -> None:
    ref = pool["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") == "Service" and ref.get("group", "") == ""
    assert ref.get("failureMode", "FailClose") == "FailClose"
    [service] = [s for s in objects(manifests, OVERLAY, "Service") if s["metadata"]["name"] == ref["name"]]
    [service_port] = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    picker = deployment(manifests, OVERLAY, "falcon-service-epp")
    spec = picker["spec"]["template"]["spec"]
    assert selects({"matchLabels": service["spec"]["selector"]}, picker["spec"]["template"]["metadata"]["labels"])
    [epp] = spec["containers"]
    named = {p["name"]: p["containerPort"] for p in epp["ports"]}
    target = service_port["targetPort"]
    grpc_port = named[target] if isinstance(target, str) else target
    args = dict(a.removeprefix("--").split("=", 1) for a in epp["args"])
    assert int(args["grpc-port"]) == grpc_port, "the Service sends ext-proc calls where the picker listens"
    assert args["pool-name"] == pool["metadata"]["name"]
    assert env(epp)["NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}  # the pool's namespace
    for probe in (epp["livenessProbe"], epp["readinessProbe"]):
        assert probe["grpc"]["port"] == int(args["grpc-health-port"])
    # the picker's configuration file is the ConfigMap mounted where --config-file points
    config_dir, config_file = args["config-file"].rsplit("/", 1)
    [mount] = [m for m in epp["volumeMounts"] if m["mountPath"] == config_dir]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    [config_map] = [c for c in objects(manifests, OVERLAY, "ConfigMap")
                    if c["metadata"]["name"] == volume["configMap"]["name"]]
    config = yaml.safe_load(config_map["data"][config_file])
    assert (config["apiVersion"], config["kind"]) == ("inference.networking.x-k8s.io/v1alpha1", "EndpointPickerConfig")
    declared = {p.get("name", p["type"]): p["type"] for p in config["plugins"]}
    assert len(declared) == len(config["plugins"]), "two plugins of one name"
    [profile] = config["schedulingProfiles"]
    used = [ref["pluginRef"] for ref in profile["plugins"]]
    assert set(used) <= set(declared), set(used) - set(declared)
    assert "prefix-cache-scorer" in {declared[u] for u in used}, "the point of the pool: prefix affinity"
    assert [declared[u] for u in used if declared[u].endswith("-picker")] == ["max-score-picker"]


def test_the_picker_scores_on_metrics_the_service_serves() -> None:
    """The scorers' inputs, by the picker's default metric names (the Inference Extension's EPP options):
    the queue (queue-scorer), KV-cache use (kv-cache-utilization-scorer), and the cache's block size
    (prefix-cache-scorer; optional)."""
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(exposition())}
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        assert families[name].type == "gauge", name
    assert "vllm:cache_config_info" in families


def test_the_picker_may_read_what_it_watches_and_reach_what_it_scrapes(
        manifests: dict[str, list[dict[str, Any]]]) -> None:
    picker = deployment(manifests, OVERLAY, "falcon-service-epp")
    spec = picker["spec"]["template"]["spec"]
    account = spec["serviceAccountName"]
    [binding] = [b for b in objects(manifests, OVERLAY, "RoleBinding")
                 if {"kind": "ServiceAccount", "name": account} in
                 [{k: s[k] for k in ("kind", "name")} for s in b["subjects"]]]
    [role] = [r for r in objects(manifests, OVERLAY, "Role") if r["metadata"]["name"] == binding["roleRef"]["name"]]
    allowed = {(group, resource) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] if {"get", "list", "watch"} <= set(rule["verbs"])}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= allowed
    writes = [rule for rule in role["rules"] if set(rule["verbs"]) - {"get", "list", "watch"}]
    assert not writes, "the picker only reads"
    assert not objects(manifests, OVERLAY, "ClusterRole"), "nothing beyond the namespace"
    # network: the picker reaches the server pods' port; they take it (ingress from any namespace)
    labels = picker["spec"]["template"]["metadata"]["labels"]
    server_labels = deployment(manifests, OVERLAY)["spec"]["template"]["metadata"]["labels"]
    [policy] = [p for p in objects(manifests, OVERLAY, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]
    to_servers = [r for r in policy["spec"]["egress"] for peer in r.get("to", [])
                  if "podSelector" in peer and selects(peer["podSelector"], server_labels)]
    assert [p["port"] for r in to_servers for p in r["ports"]] == [3000]
    ingress_ports = {p["port"] for r in policy["spec"]["ingress"] for p in r["ports"]}
    assert 9002 in ingress_ports  # the gateway's ext-proc calls
    # the picker's pod: as hardened as the server's, under the namespace's "restricted" standard
    [epp] = spec["containers"]
    sc = {**spec["securityContext"], **epp["securityContext"]}
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] >= 10000 and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert re.fullmatch(r"ghcr\.io/llm-d/llm-d-inference-scheduler:v\d+\.\d+\.\d+", epp["image"]), epp["image"]


def test_the_gateway_routes_to_the_pool(manifests: dict[str, list[dict[str, Any]]], pool: dict[str, Any]) -> None:
    [route] = objects(manifests, OVERLAY, "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] and all(p["kind"] == "Gateway" for p in route["spec"]["parentRefs"])
    [rule] = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                    "name": pool["metadata"]["name"]}]
    assert route["metadata"]["namespace"] == pool["metadata"]["namespace"]
    # a stream may last as long as the server lets it (FALCON_TIMEOUT)
    timeout = int(env(container(pod(manifests, OVERLAY))).get("FALCON_TIMEOUT", "600"))
    assert int(rule["timeouts"]["request"].removesuffix("s")) >= timeout
