"""Run a container of a rendered Deployment with podman as Kubernetes would: the same user, a read-only
root file system with only the pod's volumes writable, no capabilities, no privilege escalation, the
same memory and CPU limits, environment, working directory, command and arguments.

    python deploy/image/pod_to_podman.py RENDERED.yaml CONTAINER --volumes DIR [--publish HOST_PORT] [--read-write]

prints the `podman run` options and arguments for CONTAINER (an init container or a container of the
Deployment in RENDERED.yaml), one a line, to be placed between `podman run` and the image. Each volume
of the pod becomes a folder DIR/<volume> owned by the pod's user (an emptyDir or a claim alike, the way
fsGroup hands them over); a `medium: Memory` emptyDir becomes a tmpfs; a Secret volume gets the
Secret's keys as files (an optional Secret that is not in the manifests: an empty folder, as the kubelet
mounts it). Environment variables from the downward API's `resourceFieldRef` get the value the kubelet
gives them (a limit divided by the divisor, rounded up). `--read-write` leaves the root
file system writable, so that `podman diff` can show what the container would write outside its volumes.
scripts/image_check.sh runs the cpu-smoke overlay's init container and server this way.
"""

from __future__ import annotations

import argparse
import base64
import math
import os
import sys
from pathlib import Path
from typing import Any

import yaml

K8S_SIZE = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def _bytes(quantity: str) -> int:
    for suffix, factor in K8S_SIZE.items():
        if quantity.endswith(suffix):
            return int(float(quantity.removesuffix(suffix)) * factor)
    return int(quantity)


def _secret(docs: list[dict[str, Any]], name: str) -> dict[str, str] | None:
    """The Secret `name`'s keys and values, if the manifests have it."""
    for doc in docs:
        if doc.get("kind") == "Secret" and doc["metadata"]["name"] == name:
            values = {k: base64.b64decode(v).decode() for k, v in doc.get("data", {}).items()}
            return {**values, **doc.get("stringData", {})}
    return None


def _secret_value(docs: list[dict[str, Any]], name: str, key: str) -> str:
    secret = _secret(docs, name)
    if secret is None or key not in secret:
        raise SystemExit(f"secret {name} (key {key}) is not in the rendered manifests")
    return secret[key]


def _quantity(value: str) -> float:
    """A CPU or memory quantity as a number (cores, bytes)."""
    if value.endswith("m"):
        return int(value[:-1]) / 1000
    for suffix, factor in K8S_SIZE.items():
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * factor
    return float(value)


def _resource_field(containers: list[dict[str, Any]], own: dict[str, Any], ref: dict[str, Any]) -> str:
    """The value of a downward-API resourceFieldRef, as the kubelet computes it (rounded up)."""
    target = next(c for c in containers if c["name"] == ref.get("containerName", own["name"]))
    kind, resource = ref["resource"].split(".", 1)
    amount = _quantity(target.get("resources", {})[kind][resource])
    return str(math.ceil(amount / _quantity(str(ref.get("divisor", "1")))))


def podman_args(docs: list[dict[str, Any]], container_name: str, volumes_dir: Path, *,
                publish: int | None = None, read_write: bool = False) -> list[str]:
    """The `podman run` options and trailing command for one container of the Deployment in `docs`."""
    deployment = next(d for d in docs if d.get("kind") == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    containers = pod.get("initContainers", []) + pod["containers"]
    container = next(c for c in containers if c["name"] == container_name)
    pod_sc = pod.get("securityContext", {})
    sc = {**pod_sc, **container.get("securityContext", {})}
    uid, gid = sc["runAsUser"], sc.get("runAsGroup", sc["runAsUser"])

    args = [f"--user={uid}:{gid}", "--cap-drop=ALL"]
    if pod_sc.get("fsGroup") is not None:
        args.append(f"--group-add={pod_sc['fsGroup']}")
    if sc.get("allowPrivilegeEscalation") is False:
        args.append("--security-opt=no-new-privileges")
    if sc.get("readOnlyRootFilesystem") and not read_write:
        # podman adds writable tmpfs on /tmp, /var/tmp and /run by default; Kubernetes does not
        args += ["--read-only", "--read-only-tmpfs=false"]
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        args.append(f"--memory={_bytes(limits['memory'])}")
    if "cpu" in limits:
        cpu = limits["cpu"]
        args.append(f"--cpus={int(cpu[:-1]) / 1000 if cpu.endswith('m') else float(cpu)}")
    if container.get("workingDir"):
        args.append(f"--workdir={container['workingDir']}")

    for env in container.get("env", []):
        if "value" in env:
            args.append(f"--env={env['name']}={env['value']}")
        elif "resourceFieldRef" in env["valueFrom"]:
            value = _resource_field(containers, container, env["valueFrom"]["resourceFieldRef"])
            args.append(f"--env={env['name']}={value}")
        else:
            ref = env["valueFrom"]["secretKeyRef"]
            args.append(f"--env={env['name']}={_secret_value(docs, ref['name'], ref['key'])}")

    pod_volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = pod_volumes[mount["name"]]
        if volume.get("emptyDir", {}).get("medium") == "Memory":
            size = _bytes(volume["emptyDir"].get("sizeLimit", "64Mi"))
            args.append(f"--mount=type=tmpfs,destination={mount['mountPath']},tmpfs-size={size},"
                        f"tmpfs-mode=1777")
            continue
        if not ("emptyDir" in volume or "persistentVolumeClaim" in volume or "secret" in volume):
            raise SystemExit(f"volume {mount['name']}: only emptyDir, persistentVolumeClaim and secret are mapped")
        source = volumes_dir / mount["name"]
        source.mkdir(parents=True, exist_ok=True)
        if "secret" in volume:
            values = _secret(docs, volume["secret"]["secretName"])
            if values is None and not volume["secret"].get("optional"):
                raise SystemExit(f"secret {volume['secret']['secretName']} is not in the rendered manifests")
            for key, text in (values or {}).items():
                (source / key).write_text(text)
        if os.geteuid() == 0:  # as the fsGroup hands a volume over; a rootless podman maps users itself
            os.chown(source, uid, gid)
        if mount.get("subPath"):
            source = source / mount["subPath"]
            source.mkdir(parents=True, exist_ok=True)
        options = "ro" if mount.get("readOnly") else "rw"
        args.append(f"--volume={source}:{mount['mountPath']}:{options}")

    if publish is not None:
        port = next(p["containerPort"] for p in container.get("ports", []))
        args.append(f"--publish=127.0.0.1:{publish}:{port}")
    if container.get("command"):
        args.append(f"--entrypoint={container['command'][0]}")
    args.append("IMAGE")  # the caller puts the image here
    args += container.get("command", [])[1:] + container.get("args", [])
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rendered", type=Path)
    parser.add_argument("container")
    parser.add_argument("--volumes", type=Path, required=True, help="folder for the pod's volumes")
    parser.add_argument("--publish", type=int, help="host port (on 127.0.0.1) for the container's port")
    parser.add_argument("--read-write", action="store_true", help="leave the root file system writable")
    args = parser.parse_args(argv)
    docs = [d for d in yaml.safe_load_all(args.rendered.read_text()) if d]
    for arg in podman_args(docs, args.container, args.volumes, publish=args.publish, read_write=args.read_write):
        if "\n" in arg:
            raise SystemExit(f"an argument spans lines: {arg!r}")
        print(arg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
