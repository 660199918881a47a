"""`bentoml build` makes a Bento with the service source, pinned requirements and a Dockerfile that
installs them, and nothing else; the model only when it is to be baked into the image."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
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


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    home = tmp_path_factory.mktemp("bentoml_home")
    return home, str(import_random("tiny", bentoml_home=home))


@pytest.fixture(scope="module")
def bento(store: tuple[Path, str]) -> tuple[Path, str]:
    """The default Bento: the model stays out (loaded from a volume's store at run time)."""
    home, tag = store
    return build(home, tag, bake=False), tag


@pytest.fixture(scope="module")
def baked_bento(store: tuple[Path, str]) -> tuple[Path, str]:
    """A Bento that carries its model (for clusters without access to a model source)."""
    home, tag = store
    return build(home, tag, bake=True), tag


def test_bento_holds_service_source_and_nothing_else(bento: tuple[Path, str]) -> None:
    path, _ = bento
    src = {p.relative_to(path / "src").as_posix() for p in (path / "src").rglob("*") if p.is_file()}
    assert {"service.py", "falcon_service/service.py", "falcon_service/engine/engine.py",
            "falcon_service/api/routes.py", "bentofile.yaml"} <= src
    assert not any(p.startswith(("tests/", "benchmarks/", ".venv/", "deploy/")) for p in src), src
    assert not any("__pycache__" in p or p.endswith(".safetensors") for p in src), src
    # no model store inside the Bento: the model is a reference, resolved from the store at containerize time
    assert not (path / "models").exists()
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert total < 2 * 2**20, f"Bento is {total} bytes: something big slipped in"


def test_the_default_bento_leaves_the_model_out_and_a_baked_one_references_it(
        bento: tuple[Path, str], baked_bento: tuple[Path, str]) -> None:
    assert not yaml.safe_load((bento[0] / "bento.yaml").read_text())["services"][0].get("models")
    path, tag = baked_bento
    manifest = yaml.safe_load((path / "bento.yaml").read_text())
    assert [m["tag"] for m in manifest["services"][0]["models"]] == [tag]
    # the init container of the volume layout runs the importer from the Bento's source
    assert (bento[0] / "src" / "import_model.py").is_file()


def test_bento_asks_for_one_gpu_and_one_worker(bento: tuple[Path, str]) -> None:
    path, _ = bento
    manifest = yaml.safe_load((path / "bento.yaml").read_text())
    service = manifest["services"][0]
    assert service["config"]["resources"] == {"gpu": 1}
    assert service["config"]["workers"] == 1
    assert service["config"]["traffic"]["timeout"] >= 600
    assert {r["route"] for r in manifest["schema"]["routes"]} >= {"/generate", "/chat"}


def test_bento_pins_requirements_and_dockerfile_installs_them(bento: tuple[Path, str]) -> None:
    path, _ = bento
    reqs = (path / "env" / "python" / "requirements.txt").read_text().splitlines()
    pinned = [r for r in reqs if r and not r.startswith("#")]
    assert "torch==2.13.0" in pinned
    assert all("==" in r for r in pinned), pinned
    dockerfile = (path / "env" / "docker" / "Dockerfile").read_text()
    assert "env/python/requirements.txt" in dockerfile
    # the image takes torch's default PyPI wheel (the CUDA build); no CPU-only index is forced
    assert "download.pytorch.org/whl/cpu" not in dockerfile


def service_settings(path: Path, **env_vars: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALCON_")}
    env.update(BENTO_PATH=str(path), BENTOML_HOME=str(path.parents[2]), PYTHONPATH=str(path / "src"), **env_vars)
    code = ("from falcon_service.service import SETTINGS, MODEL_IN_BENTO; "
            "print(SETTINGS.model, SETTINGS.model_name, MODEL_IN_BENTO)")
    out = subprocess.run([sys.executable, "-c", code], cwd=path / "src", env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_service_in_a_baked_bento_defaults_to_the_bentos_model(baked_bento: tuple[Path, str]) -> None:
    path, tag = baked_bento
    assert service_settings(path) == [tag, tag.split(":")[0], "True"]


def test_service_in_the_default_bento_loads_the_model_from_the_store(bento: tuple[Path, str]) -> None:
    path, tag = bento
    assert service_settings(path, FALCON_MODEL=tag) == [tag, tag.split(":")[0], "False"]
