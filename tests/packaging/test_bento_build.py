"""`bentoml build` makes a Bento with the service source, pinned requirements and a Dockerfile that
installs them, and nothing else; the model only when it is to be baked into the image."""

from __future__ import annotations

from pathlib import Path

import yaml

# The Bentos are built once per session by conftest.py's `bento` and `baked_bento` fixtures.


def requirements(path: Path) -> list[str]:
    """The requirements of a pip requirements file: continuation lines joined, hashes and comments dropped."""
    text = path.read_text().replace("\\\n", " ")
    return [line.split(" --hash")[0].split("#")[0].strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


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
    pinned = requirements(path / "env" / "python" / "requirements.txt")
    assert "torch==2.13.0" in pinned
    assert all("==" in r for r in pinned), pinned
    dockerfile = (path / "env" / "docker" / "Dockerfile").read_text()
    assert "env/python/requirements.txt" in dockerfile
    # the image takes torch's default PyPI wheel (the CUDA build); no CPU-only index is forced
    assert "download.pytorch.org/whl/cpu" not in dockerfile


def service_settings(path: Path, **env_vars: str) -> tuple[str, str, bool]:
    """What the service inside the Bento at `path` serves: (model, model id, whether the Bento carries it)."""
    from falcon_service.service import settings_from_environment

    settings = settings_from_environment({"BENTO_PATH": str(path), **env_vars})
    return settings.model, settings.model_name, settings.bake_model


def test_service_in_a_baked_bento_defaults_to_the_bentos_model(baked_bento: tuple[Path, str]) -> None:
    path, tag = baked_bento
    assert service_settings(path) == (tag, tag.split(":")[0], True)


def test_service_in_the_default_bento_loads_the_model_from_the_store(bento: tuple[Path, str]) -> None:
    path, tag = bento
    assert service_settings(path, FALCON_MODEL=tag) == (tag, tag.split(":")[0], False)
