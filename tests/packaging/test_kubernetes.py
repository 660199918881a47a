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

# the overlays of deploy/kubernetes/overlays, and the README's compositions (conftest.COMPOSITIONS)
OVERLAYS = {"volume-model", "baked-model", "cpu-smoke", "volume-model-rwo", "inference-pool",
            "volume-model+guaranteed-qos"}
GPU_OVERLAYS = OVERLAYS - {"cpu-smoke"}
INIT_OVERLAYS = OVERLAYS - {"baked-model"}
# Validated against the oldest Kubernetes these manifests are for (the preStop `sleep` action is on by
# default from 1.30) and the newest whose schemas kubernetes-validate carries.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# No schema in kubernetes-validate: test_autoscaling_* check the ScaledObject and the PodMonitor,
# test_inference_pool.py the InferencePool (against its vendored CRD) and the HTTPRoute.
CUSTOM_RESOURCES = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "PodMonitor"),
                    ("inference.networking.k8s.io/v1", "InferencePool"), ("gateway.networking.k8s.io/v1", "HTTPRoute")}
# Each waiver is a checkov.io/skipN annotation on a Deployment that says why (base/deployment.yaml, and the
# endpoint picker's in overlays/inference-pool/epp.yaml), by Deployment name.
WAIVED = {"falcon-service": {"CKV_K8S_43", "CKV_K8S_35", "CKV_K8S_15"},
          "falcon-service-epp": {"CKV_K8S_43", "CKV_K8S_38", "CKV_K8S_15"}}
DRAIN_MARGIN_S = 30  # engine shutdown and process exit after the drain


def objects(manifests: dict[str, list[dict[str, Any]]], overlay: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in manifests[overlay] if d["kind"] == kind]


def deployment(manifests: dict[str, list[dict[str, Any]]], overlay: str,
               name: str = "falcon-service") -> dict[str, Any]:
    [found] = [d for d in objects(manifests, overlay, "Deployment") if d["metadata"]["name"] == name]
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


def test_checkov_finds_nothing_but_the_written_waivers(tools: Path, rendered: dict[str, Path],
                                                       manifests: dict[str, list[dict[str, Any]]]) -> None:
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
    waived: dict[str, set[str]] = {}
    for c in skipped:
        waived.setdefault(c["resource"].rsplit(".", 1)[-1], set()).add(c["check_id"])
    assert waived == WAIVED, waived
    assert all(c["resource"].startswith("Deployment.") for c in skipped), skipped
    assert all(c["check_result"].get("suppress_comment", "").strip() for c in skipped), skipped
    # checkov really looked at each Deployment: the hardening checks ran on it and passed
    passed: dict[tuple[str, str], set[str]] = {}
    for check in results["passed_checks"]:
        passed.setdefault((check["file_path"], check["resource"]), set()).add(check["check_id"])
    hardening = {"CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_11", "CKV_K8S_13", "CKV_K8S_14", "CKV_K8S_20", "CKV_K8S_21",
                 "CKV_K8S_22", "CKV_K8S_23", "CKV_K8S_28", "CKV_K8S_31", "CKV_K8S_37", "CKV_K8S_38", "CKV_K8S_40"}
    deployments = [key for key in passed if key[1].startswith("Deployment.")]
    assert len(deployments) == sum(len(objects({"": docs}, "", "Deployment")) for docs in manifests.values())
    assert len([key for key in deployments if key[1].endswith(".falcon-service")]) == len(OVERLAYS), deployments
    for key in deployments:
        waived_here = WAIVED[key[1].rsplit(".", 1)[-1]]
        assert hardening - waived_here <= passed[key], (key, hardening - passed[key])
    # every kind of pod (server, endpoint picker) of every overlay has a NetworkPolicy
    network_policed = {(path, resource) for (path, resource), ids in passed.items() if resource.startswith("Pod.")
                       and "CKV2_K8S_6" in ids}
    pod_kinds = sum(len(objects({"": docs}, "", "Deployment")) for docs in manifests.values())
    assert len(network_policed) == pod_kinds, network_policed


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
        # the Hub cache on the store's volume (resumable); the import's temporary folder off it, on an
        # emptyDir, so that an import cut off halfway leaves nothing on the volume
        assert mount_of(importer, init_env["HF_HOME"]) == init_mount
        volumes = {v["name"]: v for v in spec["volumes"]}
        tmp_mount = mount_of(importer, init_env["TMPDIR"])
        assert tmp_mount["name"] != init_mount["name"] and "emptyDir" in volumes[tmp_mount["name"]], name
        downloads = not ({"--tiny", "--preset", "--from-dir"} & set(importer["args"]))
        assert init_env["HF_HUB_OFFLINE"] == ("0" if downloads else init_env["HF_HUB_OFFLINE"])
        assert "HF_HUB_OFFLINE" not in server_env  # the image's 1 holds for the server
        volume = volumes[init_mount["name"]]
        if name.startswith("volume-model") or name == "inference-pool":
            [claim] = objects(manifests, name, "PersistentVolumeClaim")
            assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
            assert claim["spec"]["accessModes"] == (["ReadWriteOnce"] if name == "volume-model-rwo"
                                                    else ["ReadWriteMany"]), name
        else:
            assert "emptyDir" in volume


def test_hub_downloads_are_pinned_and_take_an_optional_token_from_a_file(
        manifests: dict[str, list[dict[str, Any]]]) -> None:
    """Every replica serves the same weights, and a restart finds them in the store without the Hub
    (import_model.py looks there first for a commit: tests/test_import_model.py); a Hub token may come
    from an optional Secret, as a file."""
    for name in INIT_OVERLAYS:
        spec = pod(manifests, name)
        importer = container(spec, "import-model")
        args = import_model.build_parser().parse_args(importer["args"])
        if args.tiny or args.preset or args.from_dir:
            continue
        assert args.revision and re.fullmatch(r"[0-9a-f]{40}", args.revision), (name, args.revision)
        assert import_model.is_commit(args.revision)
        variables = env(importer)
        assert "HF_TOKEN" not in variables, "a token as a file, never in the environment"
        token_mount = mount_of(importer, variables["HF_TOKEN_PATH"])
        assert token_mount["readOnly"] is True
        secret = next(v for v in spec["volumes"] if v["name"] == token_mount["name"])["secret"]
        assert secret["optional"] is True, "without the Secret the pod must still start"
        assert posixpath.basename(variables["HF_TOKEN_PATH"]) == "token"
    downloading = [n for n in INIT_OVERLAYS if "--tiny" not in container(pod(manifests, n), "import-model")["args"]]
    assert downloading, "no overlay downloads: the check above checked nothing"


GFD_NODES = {
    # GPU Feature Discovery's labels (product, memory in MiB, compute capability major) -> schedulable?
    "NVIDIA-A10G": (23028, 8, True),
    "NVIDIA-L4": (23034, 8, True),
    "NVIDIA-A100-SXM4-80GB": (81920, 8, True),
    "NVIDIA-H100-80GB-HBM3": (81559, 9, True),
    "NVIDIA-H100-NVL": (95830, 9, True),
    "NVIDIA-B200": (183359, 10, True),
    "NVIDIA-A100-SXM4-40GB-SHARED": (40960, 8, True),  # time-slicing renames the product
    "NVIDIA-H100-80GB-HBM3-SHARED": (81559, 9, True),
    "Tesla-T4": (15360, 7, False),  # 16 GB, no bf16
    "Tesla-V100-SXM2-32GB": (32768, 7, False),  # room, but no bf16
    "NVIDIA-A2": (15356, 8, False),  # bf16, but no room for the model and a cache
}


def node_matches(term: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a node with `labels` satisfies one nodeSelectorTerm (Kubernetes' operator semantics)."""
    for e in term["matchExpressions"]:
        value = labels.get(e["key"])
        match e["operator"]:
            case "In":
                ok = value in e["values"]
            case "NotIn":
                ok = value not in e["values"]
            case "Exists":
                ok = value is not None
            case "DoesNotExist":
                ok = value is None
            case "Gt":
                ok = value is not None and int(value) > int(e["values"][0])
            case "Lt":
                ok = value is not None and int(value) < int(e["values"][0])
        if not ok:
            return False
    return True


def test_gpu_layouts_select_gpu_nodes_and_the_smoke_test_none(manifests: dict[str, list[dict[str, Any]]]) -> None:
    for name in OVERLAYS:
        spec = pod(manifests, name)
        server = container(spec)
        if name in GPU_OVERLAYS:
            assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert spec["runtimeClassName"] == "nvidia"
            terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            terms = terms["nodeSelectorTerms"]
            for product, (memory, major, wanted) in GFD_NODES.items():
                for driver, driver_ok in (("580", True), ("575", False)):  # torch 2.13's CUDA needs R580
                    labels = {"nvidia.com/gpu.product": product, "nvidia.com/gpu.memory": str(memory),
                              "nvidia.com/gpu.compute.major": str(major), "nvidia.com/cuda.driver.major": driver}
                    assert any(node_matches(t, labels) for t in terms) == (wanted and driver_ok), \
                        (name, product, driver)
            assert env(server)["FALCON_DEVICE"] == "cuda"
        else:
            assert env(server)["FALCON_DEVICE"] == "cpu"
            for c in spec.get("initContainers", []) + spec["containers"]:
                assert not any("nvidia.com" in r for r in c["resources"].get("limits", {})), c["name"]
            assert not {"affinity", "runtimeClassName", "tolerations"} & set(spec)
            assert _bytes(server["resources"]["limits"]["memory"]) <= 4 * 2**30


def _bytes(quantity: str) -> int:
    return int(quantity[:-2]) * {"Mi": 2**20, "Gi": 2**30}[quantity[-2:]]


def _cpus(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_cpu_smoke_torch_threads_follow_the_cpu_limit(manifests: dict[str, list[dict[str, Any]]]) -> None:
    """Not sched_getaffinity (the node's cores): the limit, through the downward API, rounded up as
    Kubernetes does for a divisor of 1 (deploy/image/pod_to_podman.py computes the same for podman)."""
    server = container(pod(manifests, "cpu-smoke"))
    ref = env(server)["FALCON_TORCH_THREADS"]["resourceFieldRef"]
    assert ref["resource"] == "limits.cpu" and ref.get("containerName", server["name"]) == server["name"]
    assert _cpus(ref.get("divisor", "1")) == 1
    assert _cpus(server["resources"]["limits"]["cpu"]) >= 1


def qos_class(spec: dict[str, Any]) -> str:
    """The pod's QoS class as the kubelet computes it (cpu and memory of every container, init too)."""
    containers = spec.get("initContainers", []) + spec["containers"]
    guaranteed = True
    for c in containers:
        requests, limits = c.get("resources", {}).get("requests", {}), c.get("resources", {}).get("limits", {})
        for resource in ("cpu", "memory"):
            if resource not in limits or requests.get(resource, limits[resource]) != limits[resource]:
                guaranteed = False
    if guaranteed:
        return "Guaranteed"
    return "Burstable" if any(c.get("resources") for c in containers) else "BestEffort"


def test_guaranteed_qos_is_an_option(manifests: dict[str, list[dict[str, Any]]]) -> None:
    assert qos_class(pod(manifests, "volume-model+guaranteed-qos")) == "Guaranteed"
    assert qos_class(pod(manifests, "volume-model")) == "Burstable"  # the default asks less than it may use
    # the option changes resources only
    plain, guaranteed = deployment(manifests, "volume-model"), deployment(manifests, "volume-model+guaranteed-qos")
    for c in guaranteed["spec"]["template"]["spec"]["containers"]:
        c.pop("resources")
    for c in plain["spec"]["template"]["spec"]["containers"]:
        c.pop("resources")
    assert guaranteed == plain


def test_images_are_pinned_and_pulled_only_when_missing(manifests: dict[str, list[dict[str, Any]]]) -> None:
    """A pinned tag (or digest) with IfNotPresent: a restart or a rescheduled pod does not need the
    registry (with Always, each pod start asks it)."""
    containers = [c for docs in manifests.values() for d in docs if d["kind"] == "Deployment"
                  for c in d["spec"]["template"]["spec"].get("initContainers", []) + d["spec"]["template"]["spec"]
                  ["containers"]]
    for c in containers:
        image = c["image"]
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert "@sha256:" in image or (tag and tag != "latest"), image
        assert c["imagePullPolicy"] == "IfNotPresent", (c["name"], image)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_service_budget_and_network_policies_select_the_pods(manifests: dict[str, list[dict[str, Any]]]) -> None:
    for name in OVERLAYS:
        labels = deployment(manifests, name)["spec"]["template"]["metadata"]["labels"]
        [service] = [s for s in objects(manifests, name, "Service") if s["metadata"]["name"] == "falcon-service"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"]["ports"][0]["targetPort"] == "http"
        [budget] = objects(manifests, name, "PodDisruptionBudget")
        assert selects(budget["spec"]["selector"], labels) and budget["spec"]["maxUnavailable"] == 1
        policies = [p for p in objects(manifests, name, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]
        assert any(p["metadata"]["name"] == "falcon-service" for p in policies)
        ingress = [r for p in policies for r in p["spec"].get("ingress", [])]
        assert [port["port"] for r in ingress for port in r["ports"]] == [3000]
        egress = [r for p in policies if "Egress" in p["spec"]["policyTypes"] for r in p["spec"].get("egress", [])]
        if name in INIT_OVERLAYS - {"cpu-smoke"}:  # the init container downloads from the Hub: DNS and HTTPS only
            assert sorted({port["port"] for r in egress for port in r["ports"]}) == [53, 443]
            blocks = [peer["ipBlock"] for r in egress for peer in r["to"] if "ipBlock" in peer]
            https = [b for r in egress if {p["port"] for p in r["ports"]} == {443} for peer in r["to"]
                     for b in [peer.get("ipBlock")] if b]
            assert all("10.0.0.0/8" in b["except"] and "169.254.0.0/16" in b["except"] for b in https
                       if b["cidr"] == "0.0.0.0/0"), https  # the cluster and the cloud metadata address
            dns = [r for r in egress if {p["port"] for p in r["ports"]} == {53}]
            dns_peers = [peer for r in dns for peer in r["to"]]
            assert {"cidr": "169.254.20.10/32"} in [peer.get("ipBlock") for peer in dns_peers], \
                "NodeLocal DNSCache answers on 169.254.20.10"
            assert any("podSelector" in peer for peer in dns_peers), "and the cluster's DNS pods"
            assert blocks
        else:
            assert egress == [], name


def simulate_rollout(strategy: dict[str, Any], replicas: int, gpus: int, volume_rwo: bool) -> tuple[bool, int]:
    """Replace `replicas` pods with new ones as the Deployment controller does, on a cluster of `gpus`
    GPUs (one per pod; none spare when gpus == replicas) and, with `volume_rwo`, one volume that only a
    pod on the node holding it can mount (the old pods hold it). Returns whether the rollout finishes
    and the fewest pods serving at any point."""
    old, new_ready, new_pending = replicas, 0, 0
    fewest_serving = replicas
    for _ in range(4 * replicas + 4):
        if strategy["type"] == "Recreate":
            old = 0  # all old pods go first
            new_pending = replicas - new_ready
        else:
            surge, unavailable = strategy["rollingUpdate"]["maxSurge"], strategy["rollingUpdate"]["maxUnavailable"]
            total = old + new_ready + new_pending
            new_pending += max(0, min(replicas - new_ready - new_pending, replicas + surge - total))
            while old and old - 1 + new_ready >= replicas - unavailable:
                old -= 1
        fewest_serving = min(fewest_serving, old + new_ready)
        free = gpus - old - new_ready
        start = 0 if volume_rwo and old else min(new_pending, max(0, free))
        new_pending, new_ready = new_pending - start, new_ready + start
        if old == 0 and new_ready == replicas:
            return True, fewest_serving
    return False, fewest_serving


def test_rollout_simulation_sees_both_deadlocks() -> None:
    """The simulation below is able to fail: the former strategy deadlocked both ways."""
    former = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert simulate_rollout(former, 2, gpus=2, volume_rwo=False) == (False, 2)  # no spare GPU
    assert simulate_rollout(former, 1, gpus=2, volume_rwo=True)[0] is False  # the new pod cannot mount
    assert simulate_rollout(former, 2, gpus=3, volume_rwo=False) == (True, 2)  # with a spare GPU it went


def test_replicas_spread_and_rollouts_never_deadlock(manifests: dict[str, list[dict[str, Any]]]) -> None:
    for name in OVERLAYS:
        dep = deployment(manifests, name)
        spec, template = dep["spec"], dep["spec"]["template"]
        scaled = objects(manifests, name, "ScaledObject")
        if scaled:  # the HPA owns the count: an apply that set `replicas` would scale it back each time
            assert "replicas" not in spec, name
            replicas = scaled[0]["spec"]["minReplicaCount"]
        else:
            replicas = spec["replicas"]
        claims = objects(manifests, name, "PersistentVolumeClaim")
        rwo = any(c["spec"]["accessModes"] == ["ReadWriteOnce"] for c in claims)
        finished, fewest = simulate_rollout(spec["strategy"], replicas, gpus=replicas, volume_rwo=rwo)
        assert finished, f"{name}: a rollout on a cluster without a spare GPU never finishes"
        if name not in GPU_OVERLAYS:
            continue
        if rwo:  # one pod can hold the volume: one replica, no autoscaling, an outage at each rollout
            assert replicas == 1 and not scaled and spec["strategy"]["type"] == "Recreate", name
            continue
        assert replicas >= 2, f"{name}: one replica means an outage at every node drain"
        assert fewest >= 1, f"{name}: a rollout takes every pod down at once"
        [budget] = objects(manifests, name, "PodDisruptionBudget")
        assert budget["spec"]["maxUnavailable"] < replicas
        hostname = [c for c in template["spec"]["topologySpreadConstraints"]
                    if c["topologyKey"] == "kubernetes.io/hostname"]
        assert hostname and hostname[0]["whenUnsatisfiable"] == "DoNotSchedule" and hostname[0]["maxSkew"] == 1
        assert selects(hostname[0]["labelSelector"], template["metadata"]["labels"])
        assert "pod-template-hash" in hostname[0].get("matchLabelKeys", []), "a new revision spreads on its own"


def exposition() -> str:
    """The service's metrics as Prometheus scrapes them (the exposition format)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from falcon_service.metrics import ServiceMetrics

    registry = CollectorRegistry()
    ServiceMetrics("falcon-7b-instruct", registry=registry)
    return generate_latest(registry).decode()


def test_autoscaling_follows_the_waiting_queue_and_fails_safe(manifests: dict[str, list[dict[str, Any]]]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(exposition())}
    autoscaled = [name for name in OVERLAYS if objects(manifests, name, "ScaledObject")]
    assert set(autoscaled) == GPU_OVERLAYS - {"volume-model-rwo"}
    for name in OVERLAYS:
        scaled = objects(manifests, name, "ScaledObject")
        if name not in autoscaled:
            continue
        [scaled_object] = scaled
        spec = scaled_object["spec"]
        namespace = scaled_object["metadata"]["namespace"]
        assert spec["scaleTargetRef"]["name"] == deployment(manifests, name)["metadata"]["name"]
        assert spec["minReplicaCount"] >= 2 and spec["maxReplicaCount"] > spec["minReplicaCount"]
        [trigger] = spec["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        # no data (pods not scraped, a renamed metric) is an error, so the fallback holds, never a 0 queue
        assert trigger["metadata"]["ignoreNullValues"] == "false"
        assert spec["fallback"]["failureThreshold"] >= 1
        assert spec["fallback"]["replicas"] >= spec["minReplicaCount"]
        query = trigger["metadata"]["query"]
        # every series the query reads is a gauge the service exposes, selected by the namespace
        selectors = re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", query)
        assert [metric for metric, _ in selectors] == ["falcon_requests_waiting"], query
        for metric, matchers in selectors:
            assert families[metric].type == "gauge", metric
            assert re.fullmatch(r'namespace="([^"]+)"', matchers).group(1) == namespace
        # grouped by the pod label the scrape adds, summed over the pods
        assert re.fullmatch(r"sum\(max by \(pod\) \(\w+\{[^}]*\}\)\)", query), query
        assert float(trigger["metadata"]["threshold"]) > 0
        # and the pods are scraped: a PodMonitor for the server pods, on their port, at /metrics
        [monitor] = objects(manifests, name, "PodMonitor")
        labels = deployment(manifests, name)["spec"]["template"]["metadata"]["labels"]
        assert monitor["metadata"]["namespace"] == namespace
        assert selects(monitor["spec"]["selector"], labels)
        ports = {p["name"] for p in container(pod(manifests, name))["ports"]}
        [endpoint] = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    assert not objects(manifests, "cpu-smoke", "ScaledObject"), "no KEDA in the smoke test"


def test_the_readme_applies_what_the_tests_render(manifests: dict[str, list[dict[str, Any]]]) -> None:
    """deploy/kubernetes/README.md's `kubectl apply -k` targets and its overlay of one's own are the ones
    rendered and checked here."""
    from conftest import COMPOSITIONS

    readme = (REPO / "deploy" / "kubernetes" / "README.md").read_text()
    applied = set(re.findall(r"kubectl apply -k deploy/kubernetes/overlays/([\w-]+)", readme))
    assert applied and applied <= set(manifests), applied - set(manifests)
    overlays = {p.name for p in (REPO / "deploy" / "kubernetes" / "overlays").iterdir() if p.is_dir()}
    assert overlays <= applied, f"overlays the README does not say how to apply: {overlays - applied}"
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(# my-overlay/kustomization\.yaml\n.*?)```", readme,
                                                    re.S)]
    shown = {(tuple(p.removeprefix("../deploy/kubernetes/") for p in b["resources"]),
              tuple(p.removeprefix("../deploy/kubernetes/") for p in b["components"])) for b in blocks}
    assert shown and shown == {(tuple(r), tuple(c)) for r, c in COMPOSITIONS.values()}
