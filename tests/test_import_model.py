"""import_model.py: random presets, local directories and (mocked) Hub downloads into an isolated store.

The CLI runs as a subprocess with its own BENTOML_HOME; in-process calls pass `bentoml_home=`.
bentoml and import_model are imported lazily, so this module never fixes another test's BENTOML_HOME.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from falcon_service.checkpoints import RANDOM_MARKER, build_random_checkpoint, random_checkpoint_revision

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "import_model.py"


@pytest.fixture(scope="module")
def im() -> ModuleType:
    """The import_model module (imports bentoml)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("import_model")


@pytest.fixture
def tiny_dir(tiny_checkpoint: Path) -> Path:
    """The session's tiny random checkpoint (shared: copy it before changing it)."""
    return tiny_checkpoint


def run_cli(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python import_model.py ARGS` against the store in `home`, never the network."""
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "True",
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def tag_of(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_tiny_creates_a_loadable_random_falcon(tmp_path: Path, im: ModuleType) -> None:
    from transformers import AutoModelForCausalLM, FalconForCausalLM

    tag = tag_of(run_cli(tmp_path, "--tiny"))
    assert tag.startswith("falcon-tiny-random:")
    model = im.get_model(tag, bentoml_home=tmp_path)
    assert model.info.labels["random_weights"] == "true"
    assert model.info.labels["source"] == "random:tiny"
    assert model.info.labels["revision"] == random_checkpoint_revision("tiny", 0)
    stored = {p.name for p in Path(model.path).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", RANDOM_MARKER} <= stored
    assert set(model.info.metadata["files"]) <= stored
    assert "model.safetensors" in model.info.metadata["files"]

    lm = AutoModelForCausalLM.from_pretrained(model.path)
    assert isinstance(lm, FalconForCausalLM)
    assert lm.config.hidden_size // lm.config.num_attention_heads == 64
    assert lm.config.multi_query is True


def test_importing_twice_reuses_the_model(tmp_path: Path, im: ModuleType) -> None:
    first = tag_of(run_cli(tmp_path, "--tiny"))
    again = run_cli(tmp_path, "--preset", "tiny")
    assert tag_of(again) == first
    assert "already exists" in again.stderr
    assert len(im.list_models("falcon-tiny-random", bentoml_home=tmp_path)) == 1
    # a different seed is a different checkpoint (in process: the API the e2e fixtures use)
    other = im.import_random("tiny", seed=1, bentoml_home=tmp_path)
    assert str(other) != first
    assert other.name == "falcon-tiny-random"
    assert len(im.list_models("falcon-tiny-random", bentoml_home=tmp_path)) == 2


def test_from_dir_imports_and_recognises_the_same_content(
    tmp_path: Path, im: ModuleType, tiny_dir: Path
) -> None:
    home = tmp_path / "home"
    tag = tag_of(run_cli(home, "--from-dir", str(tiny_dir)))
    assert tag.startswith("falcon-7b-instruct:")
    model = im.get_model(tag, bentoml_home=home)
    labels = model.info.labels
    assert labels["source"] == str(tiny_dir.resolve())
    assert labels["random_weights"] == "true"  # the builder's marker travels with the directory
    assert labels["revision"] == im.content_hash(tiny_dir, model.info.metadata["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(model.path))

    # the same content elsewhere, plus a remote-code file that must not be stored: same model
    copy = shutil.copytree(tiny_dir, tmp_path / "copy")
    (copy / "modelling_RW.py").write_text("raise RuntimeError('remote code must never be imported')\n")
    assert tag_of(run_cli(home, "--from-dir", str(copy))) == tag
    # changed content: a new model
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "max_new_tokens": 7}))
    changed = tag_of(run_cli(home, "--from-dir", str(copy), "--name", "my-falcon"))
    assert changed.startswith("my-falcon:")
    changed_path = Path(im.get_model(changed, bentoml_home=home).path)
    assert not (changed_path / "modelling_RW.py").exists()
    assert json.loads((changed_path / "generation_config.json").read_text())["max_new_tokens"] == 7


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "llama", "hidden_size": 4096}, "model_type 'llama'"),
        (None, "no config.json"),
    ],
)
def test_from_dir_rejects_a_non_falcon_directory(
    tmp_path: Path, im: ModuleType, tiny_dir: Path, config: dict | None, message: str
) -> None:
    src = shutil.copytree(tiny_dir, tmp_path / "src")
    if config is None:
        (src / "config.json").unlink()
    else:
        (src / "config.json").write_text(json.dumps(config))
    result = run_cli(tmp_path / "home", "--from-dir", str(src))
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.strip() == ""
    assert im.list_models("falcon-7b-instruct", bentoml_home=tmp_path / "home") == []


def test_small_preset_shape(tmp_path: Path) -> None:
    config = json.loads((build_random_checkpoint(tmp_path, preset="small") / "config.json").read_text())
    assert config["model_type"] == "falcon"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (512, 8, 8)
    assert (config["vocab_size"], config["max_position_embeddings"]) == (2048, 2048)
    assert config["multi_query"] is True


def test_random_presets_get_their_own_default_name(im: ModuleType) -> None:
    assert im.random_model_name("small") == "falcon-small-random"
    assert im.random_model_name("tiny") != im.DEFAULT_NAME
    assert random_checkpoint_revision("tiny", 0) != random_checkpoint_revision("small", 0)
    assert random_checkpoint_revision("tiny", 0) != random_checkpoint_revision("tiny", 1)


SHA = "0123456789abcdef0123456789abcdef01234567"
REMOTE_CODE = ["configuration_falcon.py", "modelling_RW.py", "handler.py"]


def fake_hub(monkeypatch: pytest.MonkeyPatch, repo: Path, calls: list[dict]) -> None:
    """Replace the Hub with `repo`: model_info lists its files, snapshot_download copies the allowed ones."""
    import huggingface_hub

    def model_info(self, repo_id: str, *, revision: str | None = None, **kwargs):
        calls.append({"call": "model_info", "repo_id": repo_id, "revision": revision})
        files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
        return SimpleNamespace(
            sha=SHA,
            siblings=[SimpleNamespace(rfilename=f) for f in files],
            config={"model_type": "falcon"},
        )

    def snapshot_download(repo_id: str, *, revision: str | None = None, allow_patterns=None, **kwargs):
        calls.append(
            {
                "call": "snapshot_download",
                "repo_id": repo_id,
                "revision": revision,
                "allow_patterns": list(allow_patterns),
            }
        )
        out = repo.parent / f"snapshot-{len(calls)}"
        for p in repo.rglob("*"):
            rel = str(p.relative_to(repo))
            if p.is_file() and any(fnmatch.fnmatch(rel, pat) for pat in allow_patterns):
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(p, out / rel)
        return str(out)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_hub_download_is_pinned_to_a_sha_and_skips_remote_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, im: ModuleType, tiny_dir: Path
) -> None:
    repo = shutil.copytree(tiny_dir, tmp_path / "repo")
    (repo / RANDOM_MARKER).unlink()  # a real Hub repo has no such marker
    for name in REMOTE_CODE:
        (repo / name).write_text("raise RuntimeError('remote code')\n")
    (repo / "pytorch_model.bin").write_bytes(b"not needed when safetensors exist")
    (repo / "README.md").write_text("# falcon")
    (repo / "coreml").mkdir()
    (repo / "coreml" / "model.safetensors").write_bytes(b"not for transformers")
    calls: list[dict] = []
    fake_hub(monkeypatch, repo, calls)

    home = tmp_path / "home"
    tag = im.import_from_hub("tiiuae/falcon-7b-instruct", "main", "falcon-7b-instruct", bentoml_home=home)

    info, download = calls
    assert info["revision"] == "main"
    assert download["revision"] == SHA  # the resolved commit, not the moving branch
    patterns = download["allow_patterns"]
    for unwanted in [*REMOTE_CODE, "pytorch_model.bin", "README.md", "coreml/model.safetensors"]:
        assert not any(fnmatch.fnmatch(unwanted, p) for p in patterns), (unwanted, patterns)
    for wanted in ["config.json", "generation_config.json", "tokenizer.json", "model.safetensors"]:
        assert any(fnmatch.fnmatch(wanted, p) for p in patterns), (wanted, patterns)

    model = im.get_model(tag, bentoml_home=home)
    assert str(tag).startswith("falcon-7b-instruct:")
    assert model.info.labels == {
        "source": "tiiuae/falcon-7b-instruct",
        "revision": SHA,
        "random_weights": "false",
    }
    stored = set(os.listdir(model.path))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= stored
    assert not [f for f in stored if f.endswith((".py", ".bin"))]

    # the same sha again: found in the store, nothing downloaded
    assert im.import_from_hub(bentoml_home=home) == tag
    assert [c["call"] for c in calls] == ["model_info", "snapshot_download", "model_info"]
    assert len(im.list_models("falcon-7b-instruct", bentoml_home=home)) == 1


def test_hub_without_safetensors_takes_the_bin_shards(im: ModuleType) -> None:
    needed = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "special_tokens_map.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
    ]
    repo_files = [*needed, "training_args.bin", "modelling_RW.py", "configuration_RW.py", "README.md"]
    assert set(im.hub_allow_patterns(repo_files)) == set(needed)
    with pytest.raises(im.CheckpointError, match="no model"):
        im.hub_allow_patterns(["config.json", "tokenizer.json", "modelling_RW.py"])


def test_hub_refuses_a_non_falcon_repo_before_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, im: ModuleType
) -> None:
    import huggingface_hub

    def model_info(self, repo_id: str, **kwargs):
        return SimpleNamespace(sha=SHA, siblings=[], config={"model_type": "llama"})

    def snapshot_download(*args, **kwargs):
        raise AssertionError("must not download a non-Falcon repo")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(im.CheckpointError, match="model_type 'llama'"):
        im.import_from_hub("meta-llama/Llama-2-7b-hf", bentoml_home=tmp_path)


def test_7b_preset_is_falcon_7b_exactly() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from falcon_service.checkpoints import PRESETS, falcon_config

    shape = PRESETS["7b"]
    assert (shape.hidden_size, shape.num_hidden_layers, shape.num_attention_heads) == (4544, 32, 71)
    assert (shape.vocab_size, shape.max_position_embeddings, shape.dtype) == (65024, 2048, "bfloat16")
    with torch.device("meta"):  # shapes only: no memory
        model = AutoModelForCausalLM.from_config(falcon_config(shape, eos_token_id=11), dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 6_921_720_704  # tiiuae/falcon-7b-instruct's count
    assert model.dtype == torch.bfloat16


def test_a_falcon_7b_sized_tokenizer_decodes_every_id_to_text() -> None:
    from falcon_service.checkpoints import train_tokenizer

    tokenizer = train_tokenizer(65024)
    assert len(tokenizer) == 65024
    texts = tokenizer.batch_decode([[i] for i in range(65024)])
    assert all(texts), [i for i, t in enumerate(texts) if not t][:10]


def test_random_weights_on_another_device_are_another_revision() -> None:
    assert random_checkpoint_revision("tiny", 0, "cuda") != random_checkpoint_revision("tiny", 0, "cpu")
    assert random_checkpoint_revision("tiny", 0) == random_checkpoint_revision("tiny", 0, "cpu")


def test_a_stored_commit_starts_without_the_hub(tmp_path: Path, im: ModuleType, tiny_dir: Path) -> None:
    """A pod restart with a pinned revision already in the store (the Kubernetes init container) must
    not need the Hub: the CLI, offline and with the Hub's address unreachable, finds it there."""
    home = tmp_path / "home"
    stored = im.import_checkpoint(tiny_dir, "falcon-7b-instruct", source="tiiuae/falcon-7b-instruct", revision=SHA,
                                  bentoml_home=home)
    unreachable = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # the discard port: nothing answers
    result = run_cli(home, "--revision", SHA, env=unreachable)
    assert tag_of(result) == str(stored)
    assert "the Hub was not asked" in result.stderr
    # a branch may have moved: it needs the Hub, and without it the import fails, saying so
    branch = run_cli(home, "--revision", "main", env=unreachable)
    assert branch.returncode == 1 and "import_model.py: error:" in branch.stderr, branch.stderr
    assert "Traceback" not in branch.stderr
    # so does a commit that is not in the store yet
    other = run_cli(home, "--revision", "f" * 40, env=unreachable)
    assert other.returncode == 1 and "Traceback" not in other.stderr, other.stderr
    assert len(im.list_models("falcon-7b-instruct", bentoml_home=home)) == 1


def test_a_stored_commit_is_not_looked_up_on_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, im: ModuleType, tiny_dir: Path
) -> None:
    repo = shutil.copytree(tiny_dir, tmp_path / "repo")
    calls: list[dict] = []
    fake_hub(monkeypatch, repo, calls)
    home = tmp_path / "home"
    tag = im.import_from_hub("tiiuae/falcon-7b-instruct", SHA, "falcon-7b-instruct", bentoml_home=home)
    assert [c["call"] for c in calls] == ["model_info", "snapshot_download"]
    assert im.import_from_hub("tiiuae/falcon-7b-instruct", SHA, "falcon-7b-instruct", bentoml_home=home) == tag
    assert [c["call"] for c in calls] == ["model_info", "snapshot_download"], "the Hub was asked again"
    assert im.is_commit(SHA) and not im.is_commit("main") and not im.is_commit(SHA[:7])


def test_the_temporary_folder_holds_no_weights_and_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, im: ModuleType, tiny_dir: Path
) -> None:
    """BentoML builds a model in TMPDIR and copies it into the store: the init container's TMPDIR is an
    emptyDir of 2 GiB, off the model volume, so only links may go there; the store gets real files."""
    import tempfile

    temp = tmp_path / "tmpdir"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    src = shutil.copytree(tiny_dir, tmp_path / "src")
    copied: list[tuple[str, bool, int]] = []
    copytree = shutil.copytree

    def watching_copytree(source, dest, *args, **kwargs):
        if Path(source).is_relative_to(temp):  # BentoML's copy of the temporary folder into the store
            for path in Path(source).iterdir():
                copied.append((path.name, path.is_symlink(), path.lstat().st_size))
        return copytree(source, dest, *args, **kwargs)

    monkeypatch.setattr(shutil, "copytree", watching_copytree)
    home = tmp_path / "home"
    tag = im.import_from_dir(src, "falcon-7b-instruct", bentoml_home=home)
    weights = [entry for entry in copied if entry[0].endswith(".safetensors")]
    assert weights and all(is_link and size < 4096 for _, is_link, size in weights), copied
    assert list(temp.iterdir()) == [], "the temporary folder is left behind"
    shutil.rmtree(src)  # the store holds copies, not links into the source
    stored = Path(im.get_model(tag, bentoml_home=home).path)
    safetensors = stored / "model.safetensors"
    assert not safetensors.is_symlink() and safetensors.stat().st_size > 4096
    assert (tiny_dir / "model.safetensors").read_bytes() == safetensors.read_bytes()
