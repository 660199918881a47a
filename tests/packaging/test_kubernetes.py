"""The Kubernetes layout (deploy/kubernetes): every overlay renders, validates against Kubernetes' own schemas
(strict), passes checkov with only the waivers written in the manifests, and wires the service the way it
works: settings it has, a drain that fits the grace period, probes on endpoints it serves, a model store that
the init container fills where the server reads it, non-root and read-only with the paths it writes mounted."""

from __future__ import annotations

import json
import posixpath
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from falcon_service.config import Settings

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import import_model  # noqa: E402

OVERLAYS = {"volume-model", "baked-model", "cpu-smoke"}
GPU_OVERLAYS = {"volume-model", "baked-model"}
INIT_OVERLAYS = {"volume-model", "cpu-smoke"}
# Validated against the oldest Kubernetes these manifests are for (the preStop `sleep` action is on by
# default from 1.30) and the newest whose schemas kubernetes-validate carries.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
CUSTOM_RESOURCES = {("keda.sh/v1alpha1", "ScaledObject")}  # no schema offline; test_autoscaling checks it
# Each waiver is a checkov.io/skipN annotation on the Deployment that says why (see base/deployment.yaml).
WAIVED = {"CKV_K8S_43", "CKV_K8S_35"}
DRAIN_MARGIN_S = 30  # engine shutdown and process exit after the drain


def objects(manifests: dict[str, list[dict[str, Any]]], overlay: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in manifests[overlay] if d["kind"] == kind]


def deployment(manifests: dict[str, list[dict[str, Any]]], overlay: str) -> dict[str, Any]:
    [found] = objects(manifests, overlay, "Deployment")
    return found


def pod(manifests: dict[str, list[dict[str, Any]]], overlay: str) -> dict[str, Any]:
    return deployment(manifests, overlay)["spec"]["template"]["spec"]


def container(pod_spec: dict[str, Any], name: str = "falcon-service") -> dict[str, Any]:
    return next(c for c in pod_spec.get("initContainers", []) + pod_spec["containers"] if c["name"] == name)


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def mount_of(c: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The volume mount that holds `path` (the deepest one)."""
    holding = [m for m in c.get("volumeMounts", [])
               if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    return max(holding, key=lambda m: len(m["mountPath"]), default=None)


def test_every_overlay_renders_into_one_namespace(manifests: dict[str, list[dict[str, Any]]]) -> None:
    assert set(manifests) == OVERLAYS
    for name, docs in manifests.items():
        [namespace] = objects(manifests, name, "Namespace")
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        namespaced = [d for d in docs if d["kind"] != "Namespace"]
        assert {d["metadata"].get("namespace") for d in namespaced} == {namespace["metadata"]["name"]}, name
        assert namespace["metadata"]["name"] != "default"


def run_validate(tools: Path, version: str, *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tools / "kubernetes-validate"), "--strict", "-k", version, *map(str, files)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_validate_strict(tools: Path, rendered: dict[str, Path], version: str,
                                    manifests: dict[str, list[dict[str, Any]]]) -> None:
    out = run_validate(tools, version, *rendered.values())
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    count = sum(len(docs) for docs in manifests.values())
    unchecked = [line for line in lines if line.startswith("WARN")]
    assert len([line for line in lines if " passed for resource " in line]) + len(unchecked) == count, out.stdout
    # only the custom resources go without a schema, and every other object passed
    assert all(any(kind in line for _, kind in CUSTOM_RESOURCES) for line in unchecked), unchecked


def test_kubernetes_validate_is_strict_offline(tools: Path, rendered: dict[str, Path], tmp_path: Path) -> None:
    """A misspelt field fails: the schemas are the package's own (no download) and strict."""
    docs = [d for d in yaml.safe_load_all(rendered["cpu-smoke"].read_text()) if d]
    broken = next(d for d in docs if d["kind"] == "Deployment")
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    out = run_validate(tools, KUBERNETES_VERSIONS[-1], path)
    assert out.returncode != 0 and "imagePullPolcy" in out.stdout, out.stdout + out.stderr


def test_checkov_finds_nothing_but_the_written_waivers(tools: Path, rendered: dict[str, Path]) -> None:
    cmd = [str(tools / "checkov"), "--framework", "kubernetes", "--skip-download", "--output", "json"]
    for path in rendered.values():
        cmd += ["--file", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    report = json.loads(out.stdout)
    results, summary = report["results"], report["summary"]
    failed = [(c["check_id"], c["resource"], c["check_name"]) for c in results["failed_checks"]]
    assert summary["failed"] == 0 and not failed, failed
    assert summary["parsing_errors"] == 0, results["parsing_errors"]
    skipped = results["skipped_checks"]
    assert {c["check_id"] for c in skipped} == WAIVED
    assert all(c["check_result"].get("suppress_comment", "").strip() for c in skipped), skipped
    # checkov really looked at each Deployment: the hardening checks ran on it and passed
    passed: dict[tuple[str, str], set[str]] = {}
    for check in results["passed_checks"]:
        passed.setdefault((check["file_path"], check["resource"]), set()).add(check["check_id"])
    hardening = {"CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_11", "CKV_K8S_13", "CKV_K8S_14", "CKV_K8S_20", "CKV_K8S_21",
                 "CKV_K8S_22", "CKV_K8S_23", "CKV_K8S_28", "CKV_K8S_31", "CKV_K8S_37", "CKV_K8S_38", "CKV_K8S_40"}
    deployments = [key for key in passed if key[1].startswith("Deployment.")]
    assert len(deployments) == len(OVERLAYS), deployments
    for key in deployments:
        assert hardening <= passed[key], (key, hardening - passed[key])
    network_policed = {path for (path, resource), ids in passed.items() if resource.startswith("Pod.")
                       and "CKV2_K8S_6" in ids}
    assert len(network_policed) == len(OVERLAYS), network_policed


def test_manifests_set_only_falcon_settings_that_exist(manifests: dict[str, list[dict[str, Any]]]) -> None:
    for name in OVERLAYS:
        spec = pod(manifests, name)
        for c in spec.get("initContainers", []) + spec["containers"]:
            names = {n for n in env(c) if n.startswith("FALCON_")}
            unknown = {n for n in names if n.removeprefix("FALCON_").lower() not in Settings.model_fields}
            assert not unknown, (name, c["name"], unknown)
        # and the values are valid settings
        Settings.from_env({k: v for k, v in env(container(spec)).items() if k.startswith("FALCON_")
                           and isinstance(v, str)})


def test_grace_period_is_prestop_plus_drain_plus_margin(manifests: dict[str, list[dict[str, Any]]]) -> None:
    for name in OVERLAYS:
        spec = pod(manifests, name)
        server = env(container(spec))
        assert "FALCON_DRAIN_TIMEOUT" in server, f"{name}: set it, so that it cannot drift from the grace period"
        drain = int(server["FALCON_DRAIN_TIMEOUT"])
        assert drain <= int(server.get("FALCON_TIMEOUT", Settings().timeout)), name
        pre_stop = container(spec)["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert 5 <= pre_stop <= 30, name
        assert spec["terminationGracePeriodSeconds"] == pre_stop + drain + DRAIN_MARGIN_S, name


def test_probes_gate_on_the_model_load_and_liveness_stays_on_livez(
        manifests: dict[str, list[dict[str, Any]]]) -> None:
    for name in OVERLAYS:
        spec = pod(manifests, name)
        server = container(spec)
        assert server["ports"] == [{"name": "http", "containerPort": 3000}]
        startup, ready, live = server["startupProbe"], server["readinessProbe"], server["livenessProbe"]
        assert startup["httpGet"]["path"] == ready["httpGet"]["path"] == "/readyz"
        assert live["httpGet"]["path"] == "/livez"
        window = startup["periodSeconds"] * startup["failureThreshold"]
        assert window >= (15 * 60 if name in GPU_OVERLAYS else 60), (name, window)  # 7B: minutes to load
        deadline = deployment(manifests, name)["spec"]["progressDeadlineSeconds"]
        assert deadline > window + 600, (name, deadline)  # the load, and before it the image pull


def test_pods_run_non_root_read_only_with_their_writable_paths_mounted(
        manifests: dict[str, list[dict[str, Any]]]) -> None:
    for name in OVERLAYS:
        spec = pod(manifests, name)
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = {**spec["securityContext"], **c["securityContext"]}
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] >= 10000 and sc["runAsGroup"] >= 10000
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
            variables = env(c)
            writable = ["/tmp", variables["BENTOML_HOME"], variables["HOME"]]
            writable += [variables[v] for v in ("HF_HOME", "TMPDIR", "XDG_CACHE_HOME") if v in variables]
            for path in writable:
                mount = mount_of(c, path)
                assert mount is not None and not mount.get("readOnly"), (name, c["name"], path)
        server = container(spec)
        assert mount_of(server, "/dev/shm")["name"] == "dshm"
        assert "emptyDir" in volumes[mount_of(server, env(server)["BENTOML_HOME"])["name"]]
        api_key = env(server)["FALCON_API_KEY"]
        assert isinstance(api_key, dict) and "secretKeyRef" in api_key, "the API key comes from a Secret"


def stored_name(init_args: list[str]) -> str:
    """The model name import_model.py stores under, from its own command line."""
    args = import_model.build_parser().parse_args(init_args)
    preset = "tiny" if args.tiny else args.preset
    return args.name or (import_model.random_model_name(preset) if preset else import_model.DEFAULT_NAME)


def test_the_init_container_fills_the_store_the_server_reads(manifests: dict[str, list[dict[str, Any]]]) -> None:
    for name in OVERLAYS:
        spec = pod(manifests, name)
        init = {c["name"]: c for c in spec.get("initContainers", [])}
        if name not in INIT_OVERLAYS:
            assert not init and not objects(manifests, name, "PersistentVolumeClaim"), name
            continue
        importer, server = init["import-model"], container(spec)
        assert importer["image"] == server["image"]
        assert importer["command"] == ["python", "import_model.py"]
        assert env(server)["FALCON_MODEL"] == stored_name(importer["args"]), name
        init_env, server_env = env(importer), env(server)
        # the importer's store (BENTOML_HOME/models), seen by the server as its own BENTOML_HOME/models
        store = posixpath.join(init_env["BENTOML_HOME"], "models")
        init_mount = mount_of(importer, store)
        server_mount = mount_of(server, posixpath.join(server_env["BENTOML_HOME"], "models"))
        assert init_mount["name"] == server_mount["name"], name
        assert server_mount["mountPath"] == posixpath.join(server_env["BENTOML_HOME"], "models")
        assert server_mount["subPath"] == posixpath.relpath(store, init_mount["mountPath"])
        assert server_mount["readOnly"] is True
        # the Hub cache and the import's temporary folder on the store's file system: hard links, resumable
        assert mount_of(importer, init_env["HF_HOME"]) == mount_of(importer, init_env["TMPDIR"]) == init_mount
        downloads = not ({"--tiny", "--preset", "--from-dir"} & set(importer["args"]))
        assert init_env["HF_HUB_OFFLINE"] == ("0" if downloads else init_env["HF_HUB_OFFLINE"])
        assert "HF_HUB_OFFLINE" not in server_env  # the image's 1 holds for the server
        volume = next(v for v in spec["volumes"] if v["name"] == init_mount["name"])
        if name == "volume-model":
            [claim] = objects(manifests, name, "PersistentVolumeClaim")
            assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
            assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        else:
            assert "emptyDir" in volume


def test_gpu_layouts_select_gpu_nodes_and_the_smoke_test_none(manifests: dict[str, list[dict[str, Any]]]) -> None:
    for name in OVERLAYS:
        spec = pod(manifests, name)
        server = container(spec)
        if name in GPU_OVERLAYS:
            assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert spec["runtimeClassName"] == "nvidia"
            terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            expressions = {e["key"]: e for e in terms["nodeSelectorTerms"][0]["matchExpressions"]}
            assert expressions["nvidia.com/gpu.product"]["operator"] == "In"
            assert expressions["nvidia.com/cuda.driver.major"] == {
                "key": "nvidia.com/cuda.driver.major", "operator": "Gt", "values": ["579"]}  # R580 or newer
            assert env(server)["FALCON_DEVICE"] == "cuda"
        else:
            assert env(server)["FALCON_DEVICE"] == "cpu"
            for c in spec.get("initContainers", []) + spec["containers"]:
                assert not any("nvidia.com" in r for r in c["resources"].get("limits", {})), c["name"]
            assert not {"affinity", "runtimeClassName", "tolerations"} & set(spec)
            assert _bytes(server["resources"]["limits"]["memory"]) <= 4 * 2**30


def _bytes(quantity: str) -> int:
    return int(quantity[:-2]) * {"Mi": 2**20, "Gi": 2**30}[quantity[-2:]]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_service_budget_and_network_policies_select_the_pods(manifests: dict[str, list[dict[str, Any]]]) -> None:
    for name in OVERLAYS:
        labels = deployment(manifests, name)["spec"]["template"]["metadata"]["labels"]
        [service] = objects(manifests, name, "Service")
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"]["ports"][0]["targetPort"] == "http"
        [budget] = objects(manifests, name, "PodDisruptionBudget")
        assert selects(budget["spec"]["selector"], labels) and budget["spec"]["maxUnavailable"] == 1
        policies = [p for p in objects(manifests, name, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]
        assert any(p["metadata"]["name"] == "falcon-service" for p in policies)
        ingress = [r for p in policies for r in p["spec"].get("ingress", [])]
        assert [port["port"] for r in ingress for port in r["ports"]] == [3000]
        egress = [r for p in policies if "Egress" in p["spec"]["policyTypes"] for r in p["spec"].get("egress", [])]
        if name == "volume-model":  # the init container downloads from the Hub: DNS and HTTPS only
            assert sorted({port["port"] for r in egress for port in r["ports"]}) == [53, 443]
            blocks = [peer["ipBlock"] for r in egress for peer in r["to"] if "ipBlock" in peer]
            assert all("10.0.0.0/8" in b["except"] for b in blocks if b["cidr"] == "0.0.0.0/0")
        else:
            assert egress == [], name


def test_autoscaling_follows_the_waiting_queue(manifests: dict[str, list[dict[str, Any]]]) -> None:
    from prometheus_client import CollectorRegistry

    from falcon_service.metrics import ServiceMetrics

    registry = CollectorRegistry()
    ServiceMetrics("falcon-7b-instruct", registry=registry)
    metric_names = {m.name for m in registry.collect()}
    for name in OVERLAYS:
        scaled = objects(manifests, name, "ScaledObject")
        if name not in GPU_OVERLAYS:
            assert not scaled, "no KEDA in the smoke test"
            continue
        [scaled_object] = scaled
        spec = scaled_object["spec"]
        assert spec["scaleTargetRef"]["name"] == deployment(manifests, name)["metadata"]["name"]
        assert spec["minReplicaCount"] >= 1 and spec["maxReplicaCount"] > spec["minReplicaCount"]
        [trigger] = spec["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        query = trigger["metadata"]["query"]
        metric = re.match(r"sum\((\w+)\{", query).group(1)
        assert metric == "falcon_requests_waiting" and metric in metric_names
        assert f'namespace="{scaled_object["metadata"]["namespace"]}"' in query
        assert float(trigger["metadata"]["threshold"]) > 0
