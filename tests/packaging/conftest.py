"""Fixtures of the packaging checks: the Bentos that `bentoml build` makes, the overlays as kustomize renders
them, and the venv of the check tools (check_tools.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from check_tools import tools_bin

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZE_DIR = REPO / "deploy" / "kubernetes"
OVERLAYS_DIR = KUSTOMIZE_DIR / "overlays"
# Layouts that deploy/kubernetes/README.md has users compose in an overlay of their own: name ->
# (resources, components), paths under deploy/kubernetes.
COMPOSITIONS = {
    "volume-model+guaranteed-qos": (["overlays/volume-model"], ["components/guaranteed-qos"]),
}
sys.path.insert(0, str(REPO))

from import_model import import_random  # noqa: E402


def build(home: Path, tag: str, bake: bool) -> Path:
    env = {**os.environ, "BENTOML_HOME": str(home), "FALCON_MODEL": tag.split(":")[0], "BENTOML_DO_NOT_TRACK": "True",
           "FALCON_BAKE_MODEL": str(bake).lower()}
    out = subprocess.run(
        [str(Path(sys.executable).with_name("bentoml")), "build", "--output", "tag"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    bento_tag = out.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = bento_tag.split(":")
    path = home / "bentos" / name / version
    assert path.is_dir(), bento_tag
    return path


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    home = tmp_path_factory.mktemp("bentoml_home")
    return home, str(import_random("tiny", bentoml_home=home))


@pytest.fixture(scope="session")
def bento(store: tuple[Path, str]) -> tuple[Path, str]:
    """The default Bento: the model stays out (loaded from a volume's store at run time)."""
    home, tag = store
    return build(home, tag, bake=False), tag


@pytest.fixture(scope="session")
def baked_bento(store: tuple[Path, str]) -> tuple[Path, str]:
    """A Bento that carries its model (for clusters without access to a model source)."""
    home, tag = store
    return build(home, tag, bake=True), tag


@pytest.fixture(scope="session")
def tools() -> Path:
    """The bin folder of the check tools' venv (made by scripts/setup.sh)."""
    return tools_bin()


def compose(root: Path, resources: list[str], components: list[str]) -> Path:
    """An overlay of one's own in `root` (as the README shows it): `resources` and `components` of
    deploy/kubernetes, by relative paths (kustomize refuses absolute ones)."""
    root.mkdir(parents=True, exist_ok=True)
    rel = [os.path.relpath(KUSTOMIZE_DIR / p, root) for p in resources], \
        [os.path.relpath(KUSTOMIZE_DIR / p, root) for p in components]
    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": rel[0], "components": rel[1]}))
    return root


@pytest.fixture(scope="session")
def rendered(tools: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each overlay of deploy/kubernetes, and each composition the README shows, rendered by kustomize
    (kubectl's) into a file."""
    out_dir = tmp_path_factory.mktemp("rendered")
    targets = {p.name: p for p in sorted(OVERLAYS_DIR.iterdir()) if p.is_dir()}
    for name, (resources, components) in COMPOSITIONS.items():
        targets[name] = compose(tmp_path_factory.mktemp("composed") / name, resources, components)
    files = {}
    for name, target in targets.items():
        out = subprocess.run([str(tools / "kubectl"), "kustomize", str(target)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, f"{name}: {out.stderr}"
        files[name] = out_dir / f"{name}.yaml"
        files[name].write_text(out.stdout)
    return files


@pytest.fixture(scope="session")
def manifests(rendered: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    """The rendered objects of each overlay."""
    return {name: [d for d in yaml.safe_load_all(path.read_text()) if d] for name, path in rendered.items()}
