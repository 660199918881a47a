"""The image's recipe: the Bento's generated Dockerfile lints clean but for BentoML's own template (listed
below, each with where it comes from), installs a lock of every package pinned with hashes (PyPI's CUDA
build of torch), and takes the build tools out again; scripts/image_check.sh builds and runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy" / "image"))

from pod_to_podman import podman_args  # noqa: E402

# hadolint's findings on BentoML 1.4's Dockerfile template that bentofile.yaml cannot change, as
# (rule, a fragment of the line it names). A new finding fails the test; so does one that went away
# (BentoML fixed it: take it out of this list).
BENTOML_TEMPLATE_FINDINGS = {
    # the user block: `&>` under /bin/sh, and useradd without -l (a lastlog entry for uid 10001: KBs)
    ("SC3020", "RUN if command -v groupadd &>/dev/null"),
    ("DL3046", "RUN if command -v groupadd &>/dev/null"),
    # the default system packages, always installed, unpinned, lists kept: deploy/image/slim.sh (the
    # bentofile's setup_script) purges build-essential, git and gnupg2 and deletes the lists afterwards
    ("DL3008", "apt-get install -q -y --no-install-recommends --allow-remove-essential ca-certificates"),
    ("DL3009", "apt-get install -q -y --no-install-recommends --allow-remove-essential ca-certificates"),
    # the uv bootstrap: `uv --version | awk` without pipefail (a version check; uv itself is hash-pinned)
    ("DL4006", "RUN { command -v uv >/dev/null && uv --version | awk"),
    # USER bentoml by name: the manifests run as the numeric 10001 (runAsUser), the uid the image gets
    ("DL3066", "USER bentoml"),
}


def requirements(path: Path) -> dict[str, str]:
    """name -> version of the `name==version` lines of a requirements file (hashes and comments dropped)."""
    text = path.read_text().replace("\\\n", " ")
    pins = {}
    for line in text.splitlines():
        line = line.split("#")[0].split(" --hash")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not pinned"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def test_hadolint_finds_only_bentomls_template(tools: Path, bento: tuple[Path, str]) -> None:
    dockerfile = bento[0] / "env" / "docker" / "Dockerfile"
    out = subprocess.run([str(tools / "hadolint"), "--no-fail", "--format", "json", str(dockerfile)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = dockerfile.read_text().splitlines()
    found = {(f["code"], lines[f["line"] - 1].strip()) for f in json.loads(out.stdout)}
    known = {(code, line) for code, line in found for known_code, fragment in BENTOML_TEMPLATE_FINDINGS
             if code == known_code and fragment in line}
    assert not found - known, f"new hadolint findings: {sorted(found - known)}"
    gone = {k for k in BENTOML_TEMPLATE_FINDINGS if not any(k[0] == c and k[1] in line for c, line in found)}
    assert not gone, f"no longer found (take them out of the list): {sorted(gone)}"


def test_the_image_installs_the_lock_then_takes_the_build_tools_out(bento: tuple[Path, str]) -> None:
    path, _ = bento
    dockerfile = (path / "env" / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim-bookworm ", dockerfile, re.M)  # Debian 12, named
    assert "ARG BENTO_PATH=/home/bentoml/bento" in dockerfile  # the init container's workingDir is its src/
    install = dockerfile.index("pip install -r $BENTO_PATH/env/python/requirements.txt")
    scripts = [p for p in (path / "env" / "docker").iterdir() if p.name.startswith("script__")]
    assert [p.read_text() for p in scripts] == [(REPO / "deploy" / "image" / "slim.sh").read_text()]
    assert dockerfile.index(f"./env/docker/{scripts[0].name}") > install
    assert re.search(r"apt-get purge .*--auto-remove .*RecommendsImportant=false.*build-essential git gnupg2",
                     scripts[0].read_text().replace("\\\n", " "))
    assert "rm -rf /var/lib/apt/lists/*" in scripts[0].read_text()
    # what the image installs is the lock, every package pinned
    assert requirements(path / "env" / "python" / "requirements.txt") == requirements(REPO / "requirements-image.txt")


def test_the_lock_pins_requirements_txt_and_pypis_cuda_build_of_torch() -> None:
    lock_text = (REPO / "requirements-image.txt").read_text()
    lock = requirements(REPO / "requirements-image.txt")
    direct = requirements(REPO / "requirements.txt")
    assert {name: lock.get(name) for name in direct} == direct, "regenerate requirements-image.txt (see its top)"
    assert lock["torch"] == "2.13.0"
    # PyPI's Linux build of torch brings its CUDA libraries as wheels: the lock is not the CPU build
    assert {"nvidia-cublas", "nvidia-cuda-runtime", "nvidia-cudnn-cu13", "triton"} <= set(lock)
    assert "+cpu" not in lock_text and "download.pytorch.org" not in lock_text
    entries = lock_text.replace("\\\n", " ").split("\n")
    unhashed = [e for e in entries if "==" in e.split("#")[0] and "--hash=sha256:" not in e]
    assert not unhashed, unhashed


def test_pod_to_podman_runs_the_smoke_pod_as_kubernetes_would(rendered: dict[str, Path], tmp_path: Path) -> None:
    """scripts/image_check.sh runs the cpu-smoke pod through pod_to_podman.py: what it takes from the manifest."""
    docs: list[dict[str, Any]] = [d for d in yaml.safe_load_all(rendered["cpu-smoke"].read_text()) if d]
    init = podman_args(docs, "import-model", tmp_path)
    server = podman_args(docs, "falcon-service", tmp_path, publish=18000)
    for args in (init, server):
        assert {"--user=10001:10001", "--cap-drop=ALL", "--security-opt=no-new-privileges", "--read-only",
                "--read-only-tmpfs=false"} <= set(args)
    assert init[-3:] == ["IMAGE", "import_model.py", "--tiny"] and "--entrypoint=python" in init
    assert f"--volume={tmp_path}/model-store:/var/lib/falcon:rw" in init
    assert server[-2:] == ["IMAGE", "serve"]
    assert f"--volume={tmp_path}/model-store/bentoml/models:/var/lib/bentoml/models:ro" in server
    assert f"--volume={tmp_path}/bentoml-home:/var/lib/bentoml:rw" in server
    assert any(a.startswith("--mount=type=tmpfs,destination=/dev/shm,") for a in server)
    assert "--env=FALCON_API_KEY=smoke-test-key" in server and "--publish=127.0.0.1:18000:3000" in server
    # torch threads from the CPU limit (2), as the kubelet's downward API gives them
    assert "--env=FALCON_TORCH_THREADS=2" in server
    # the optional Hub token Secret is not in the smoke test: an empty folder, read-only
    assert f"--volume={tmp_path}/hf-token:/var/run/secrets/huggingface:ro" in init
    assert list((tmp_path / "hf-token").iterdir()) == []
    assert "--read-only" not in podman_args(docs, "falcon-service", tmp_path, read_write=True)

