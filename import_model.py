"""Put a Falcon checkpoint into the BentoML model store.

    python import_model.py                          # tiiuae/falcon-7b-instruct from the Hugging Face Hub
    python import_model.py --revision <branch|sha>  # a pinned revision
    python import_model.py --from-dir ./falcon      # a local checkpoint directory
    python import_model.py --tiny                   # random weights, no download (tests, development)
    python import_model.py --preset small --seed 1
    python import_model.py --preset 7b              # random weights of Falcon-7B's exact shape (GPU checks)

Only what serving needs is stored: config, generation config, tokenizer files and one weight
format (safetensors when there is any); never remote-code `*.py` files, since transformers
supports Falcon natively. Each model is labelled with its source, its revision (commit sha,
content hash or random-preset id) and whether its weights are random. Importing the same
revision under the same name again reuses the stored model: a Hub commit (`--revision SHA`) is
looked up in the store before the Hub is asked anything, so a restart with a pinned revision works
while the Hub is down. The last line of stdout is the tag. The store is the one in BENTOML_HOME (or
`bentoml_home=` in the functions below).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import bentoml
from bentoml.exceptions import NotFound

from falcon_service.checkpoints import (
    PRESETS,
    RANDOM_MARKER,
    build_random_checkpoint,
    default_build_device,
    random_checkpoint_revision,
)

DEFAULT_MODEL_ID = "tiiuae/falcon-7b-instruct"
DEFAULT_REVISION = "main"
DEFAULT_NAME = "falcon-7b-instruct"

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A source that cannot be imported as a servable Falcon checkpoint."""


def random_model_name(preset: str) -> str:
    """The default store name of a random preset, never the name of the real model."""
    return f"falcon-{preset}-random"


def serving_files(names: Iterable[str]) -> list[str]:
    """The top-level files among `names` that serving needs: config, tokenizer, one weight format."""
    top = {n for n in names if "/" not in n}
    keep = [n for n in (*CONFIG_FILES, *TOKENIZER_FILES, RANDOM_MARKER) if n in top]
    safetensors = sorted(n for n in top if n.startswith("model") and n.endswith(".safetensors"))
    if safetensors:
        weights = safetensors + ([SAFETENSORS_INDEX] if SAFETENSORS_INDEX in top else [])
    else:
        weights = sorted(n for n in top if n.startswith("pytorch_model") and n.endswith(".bin"))
        weights += [BIN_INDEX] if BIN_INDEX in top else []
    return keep + weights


def hub_allow_patterns(repo_files: Iterable[str]) -> list[str]:
    """`snapshot_download` allow_patterns for a repo listing: the exact serving files, no `*.py`."""
    files = serving_files(repo_files)
    if not any(f.endswith((".safetensors", ".bin")) for f in files):
        raise CheckpointError("the repository has no model*.safetensors or pytorch_model*.bin weights")
    return files


def validate_checkpoint(src_dir: str | Path, files: Sequence[str]) -> dict[str, Any]:
    """Check that `files` in `src_dir` form a Falcon checkpoint transformers can serve; return its config."""
    src = Path(src_dir)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{src} has no config.json: not a Hugging Face checkpoint directory")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from None
    model_type = config.get("model_type")
    if model_type != "falcon":
        hint = ""
        if model_type in ("RefinedWeb", "RefinedWebModel"):
            hint = " (an old remote-code Falcon config; use a revision whose config says 'falcon')"
        raise CheckpointError(
            f"{config_path} has model_type {model_type!r}{hint}; this service serves Falcon "
            "checkpoints (model_type 'falcon')"
        )
    weights = [f for f in files if f.endswith((".safetensors", ".bin"))]
    if not weights:
        raise CheckpointError(f"{src} has no model*.safetensors or pytorch_model*.bin weights")
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        if index_name in files:
            shards = set(json.loads((src / index_name).read_text()).get("weight_map", {}).values())
            missing = sorted(shards - set(files))
            if missing:
                raise CheckpointError(f"{src / index_name} lists shards that are missing: {missing}")
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= set(files):
        raise CheckpointError(f"{src} has no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    return config


def content_hash(src_dir: str | Path, files: Iterable[str]) -> str:
    """sha256 over the names and bytes of `files`, so the same content is recognised wherever it lies."""
    digest = hashlib.sha256()
    for name in sorted(files):
        path = Path(src_dir) / name
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _store_kwargs(bentoml_home: str | Path | None) -> dict[str, Any]:
    """Route bentoml calls to the store under `bentoml_home`; none means the BENTOML_HOME one."""
    if bentoml_home is None:
        return {}
    from bentoml._internal.models.model import ModelStore

    models_dir = Path(bentoml_home) / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    return {"_model_store": ModelStore(models_dir)}


def _home(bentoml_home: str | Path | None) -> Path:
    """The BentoML home whose store is meant: `bentoml_home`, else BENTOML_HOME's (default ~/bentoml)."""
    if bentoml_home is not None:
        return Path(bentoml_home)
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get())


def list_models(name: str, bentoml_home: str | Path | None = None) -> list[bentoml.Model]:
    """Every stored version of model `name` (none if the name is unknown)."""
    try:
        return bentoml.models.list(name, **_store_kwargs(bentoml_home))
    except NotFound:
        return []


def get_model(tag: str | bentoml.Tag, bentoml_home: str | Path | None = None) -> bentoml.Model:
    """A stored model by tag, from the store under `bentoml_home` or BENTOML_HOME's."""
    return bentoml.models.get(tag, **_store_kwargs(bentoml_home))


def find_existing(name: str, revision: str, bentoml_home: str | Path | None = None) -> bentoml.Tag | None:
    """The newest stored model called `name` whose revision label is `revision`, if any."""
    matches = [m for m in list_models(name, bentoml_home) if m.info.labels.get("revision") == revision]
    if not matches:
        return None
    return max(matches, key=lambda m: m.info.creation_time).tag


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def is_commit(revision: str) -> bool:
    """Whether `revision` names a Hub commit (a full sha), which never moves, rather than a branch or tag."""
    return re.fullmatch(r"[0-9a-f]{40}", revision) is not None


def _link(src: Path, dst: Path) -> None:
    """A symbolic link to the file itself (the Hub cache holds symlinks to blobs): BentoML builds the
    model in a temporary folder and copies it into the store, following links, so the temporary folder
    holds no weights and may lie on another file system (an emptyDir) than the store."""
    os.symlink(src.resolve(), dst)


def import_checkpoint(
    src_dir: str | Path,
    name: str,
    *,
    source: str,
    revision: str | None = None,
    random_weights: bool | None = None,
    metadata: dict[str, Any] | None = None,
    bentoml_home: str | Path | None = None,
) -> bentoml.Tag:
    """Validate a checkpoint directory and store its serving files as model `name`.

    `revision` defaults to a content hash; a model with the same name and revision is reused.
    `random_weights` defaults to whether the directory carries the random-checkpoint marker.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a directory")
    files = serving_files(p.name for p in src.iterdir() if p.is_file())
    validate_checkpoint(src, files)
    if revision is None:
        revision = content_hash(src, files)
    existing = find_existing(name, revision, bentoml_home)
    if existing is not None:
        _note(f"{existing} already exists (revision {revision}); not importing again")
        return existing
    if random_weights is None:
        random_weights = RANDOM_MARKER in files
    labels = {"source": source, "revision": revision, "random_weights": str(random_weights).lower()}
    info = {
        **(metadata or {}),
        "source": source,
        "revision": revision,
        "random_weights": random_weights,
        "files": files,
        "total_bytes": sum((src / f).stat().st_size for f in files),
    }
    with bentoml.models.create(name, labels=labels, metadata=info, **_store_kwargs(bentoml_home)) as model:
        building = Path(model.path)  # a temporary folder (TMPDIR); the store gets a copy at the end
        for f in files:
            _link(src / f, building / f)
    shutil.rmtree(building, ignore_errors=True)  # BentoML leaves it behind
    _note(f"imported {source} (revision {revision}) as {model.tag}")
    return model.tag


def import_from_dir(
    path: str | Path, name: str = DEFAULT_NAME, *, bentoml_home: str | Path | None = None
) -> bentoml.Tag:
    """Import a local Falcon checkpoint directory; its revision is a hash of its content."""
    src = Path(path).resolve()
    if name == DEFAULT_NAME and (src / RANDOM_MARKER).is_file():
        _note(f"warning: {src} holds random weights ({RANDOM_MARKER}) but is stored as {name}")
    return import_checkpoint(src, name, source=str(src), bentoml_home=bentoml_home)


def import_random(
    preset: str = "tiny",
    name: str | None = None,
    seed: int = 0,
    *,
    device: str | None = None,
    bentoml_home: str | Path | None = None,
) -> bentoml.Tag:
    """Build (unless already stored) and import a random-weight Falcon checkpoint of `preset`.

    The weights are drawn on `device` (default: the GPU when there is one); the build goes through
    a folder inside the model store's own file system, so the files are hard-linked, not copied.
    """
    if preset not in PRESETS:
        raise CheckpointError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    name = name or random_model_name(preset)
    device = device or default_build_device()
    revision = random_checkpoint_revision(preset, seed, device)
    existing = find_existing(name, revision, bentoml_home)
    if existing is not None:
        _note(f"{existing} already exists (random preset {preset}, seed {seed}); not building again")
        return existing
    home = _home(bentoml_home)
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"falcon-{preset}-", dir=home) as tmp:
        build_random_checkpoint(tmp, preset=preset, seed=seed, device=device)
        return import_checkpoint(
            tmp,
            name,
            source=f"random:{preset}",
            revision=revision,
            random_weights=True,
            metadata={"preset": preset, "seed": seed, "device": device},
            bentoml_home=bentoml_home,
        )


def import_from_hub(
    model_id: str = DEFAULT_MODEL_ID,
    revision: str = DEFAULT_REVISION,
    name: str = DEFAULT_NAME,
    *,
    download_dir: str | Path | None = None,
    bentoml_home: str | Path | None = None,
) -> bentoml.Tag:
    """Download the serving files of `model_id` at `revision` (resolved to a commit sha) and import them.

    A commit that is already in the store under `name` is returned without asking the Hub (a branch or
    tag must be resolved first: it may have moved). Files go to the Hugging Face cache (resumable,
    honours HF_HOME and HF_TOKEN / HF_TOKEN_PATH) unless `download_dir` is given.
    """
    import huggingface_hub as hf

    if is_commit(revision) and (stored := find_existing(name, revision, bentoml_home)) is not None:
        _note(f"{stored} already exists ({model_id} at {revision}); the Hub was not asked")
        return stored
    api = hf.HfApi()
    info = api.model_info(model_id, revision=revision)
    sha = info.sha
    if not sha:
        raise CheckpointError(f"the Hub gave no commit sha for {model_id}@{revision}")
    hub_config = getattr(info, "config", None)
    if isinstance(hub_config, dict) and hub_config.get("model_type") not in (None, "falcon"):
        raise CheckpointError(
            f"{model_id}@{revision} has model_type {hub_config['model_type']!r}; "
            "this service serves Falcon checkpoints (model_type 'falcon')"
        )
    existing = find_existing(name, sha, bentoml_home)
    if existing is not None:
        _note(f"{existing} already exists ({model_id} at {sha}); not downloading again")
        return existing
    siblings = getattr(info, "siblings", None)
    if siblings is not None:
        repo_files = [s.rfilename for s in siblings]
    else:
        repo_files = api.list_repo_files(model_id, revision=sha)
    patterns = hub_allow_patterns(repo_files)
    _note(f"downloading {model_id} at {sha}: {', '.join(patterns)}")
    local = hf.snapshot_download(
        model_id,
        revision=sha,
        allow_patterns=patterns,
        local_dir=str(download_dir) if download_dir is not None else None,
    )
    return import_checkpoint(
        local,
        name,
        source=model_id,
        revision=sha,
        metadata={"model_id": model_id, "requested_revision": revision},
        bentoml_home=bentoml_home,
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line of `import_model.py`."""
    parser = argparse.ArgumentParser(
        description="Put a Falcon checkpoint into the BentoML model store (BENTOML_HOME); "
        "prints the model tag as the last line of stdout.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--from-dir", metavar="PATH", help="import a local Falcon checkpoint directory")
    source.add_argument("--tiny", action="store_true", help="random-weight tiny checkpoint (= --preset tiny)")
    source.add_argument("--preset", choices=sorted(PRESETS), help="random-weight checkpoint of this size")
    parser.add_argument("--model-id", help=f"Hugging Face Hub repository (default {DEFAULT_MODEL_ID})")
    parser.add_argument("--revision", help=f"Hub branch, tag or commit (default {DEFAULT_REVISION}); a commit "
                        "already in the store is used without asking the Hub")
    parser.add_argument("--download-dir", help="download the Hub files here instead of the HF cache")
    parser.add_argument("--seed", type=int, help="seed of a random preset (default 0)")
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        help="where a random preset's weights are drawn (default: cuda when present)")
    parser.add_argument(
        "--name",
        help=f"model name in the store (default {DEFAULT_NAME}; {random_model_name('<preset>')} "
        "for random presets)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = "tiny" if args.tiny else args.preset
    local = preset is not None or args.from_dir is not None
    if local and (args.model_id or args.revision or args.download_dir):
        parser.error("--model-id, --revision and --download-dir are for Hub downloads only")
    if (args.seed is not None or args.device is not None) and preset is None:
        parser.error("--seed and --device are for --tiny / --preset only")
    try:
        if preset is not None:
            tag = import_random(preset, args.name, args.seed or 0, device=args.device)
        elif args.from_dir is not None:
            tag = import_from_dir(args.from_dir, args.name or DEFAULT_NAME)
        else:
            tag = import_from_hub(
                args.model_id or DEFAULT_MODEL_ID,
                args.revision or DEFAULT_REVISION,
                args.name or DEFAULT_NAME,
                download_dir=args.download_dir,
            )
    except (CheckpointError, OSError) as e:
        _note(f"import_model.py: error: {e}")
        return 1
    print(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
