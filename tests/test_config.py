"""Settings come from FALCON_* variables, typed and range-checked."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest
from pydantic import ValidationError

from falcon_service import config
from falcon_service.config import Settings
from falcon_service.engine import EngineOptions


def test_settings_read_from_environment() -> None:
    s = Settings.from_env({"FALCON_MODEL": "falcon-tiny-random:abc", "FALCON_MAX_BATCH_SIZE": "8",
                           "FALCON_DEFAULT_CHAT_STOP": "false", "UNRELATED": "1"})
    assert s.model == "falcon-tiny-random:abc"
    assert s.model_name == "falcon-tiny-random"
    assert s.max_batch_size == 8
    assert s.default_chat_stop is False


def test_served_model_name_overrides_store_name() -> None:
    assert Settings.from_env({"FALCON_SERVED_MODEL_NAME": "falcon"}).model_name == "falcon"


def test_device_and_dtype_defaults() -> None:
    s = Settings.from_env({})
    assert s.torch_device(cuda_available=True) == "cuda"
    assert s.torch_device(cuda_available=False) == "cpu"
    assert s.dtype == "auto" and s.cuda_graphs is True
    assert Settings.from_env({"FALCON_DTYPE": "float16"}).dtype == "float16"


@pytest.mark.parametrize("var,value", [("FALCON_MAX_BATCH_SIZE", "0"), ("FALCON_DEVICE", "tpu"),
                                       ("FALCON_KV_CACHE_MEMORY_FRACTION", "1.5")])
def test_invalid_settings_are_rejected(var: str, value: str) -> None:
    with pytest.raises(ValidationError):
        Settings.from_env({var: value})


def test_prefix_caching_is_on_by_default_and_off_with_its_variable() -> None:
    assert Settings.from_env({}).engine_options().prefix_caching is True
    assert Settings.from_env({"FALCON_PREFIX_CACHING": "false"}).engine_options().prefix_caching is False


def test_the_engines_defaults_are_written_once_in_the_engine() -> None:
    """Each engine option's default is EngineOptions' (engine/options.py), which Settings names rather than repeats."""
    engine_fields = {f.name for f in fields(EngineOptions)}
    tree = ast.parse(Path(config.__file__).read_text())
    settings = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    written = {node.target.id: ast.unparse(node.value.args[0]) for node in settings.body
               if isinstance(node, ast.AnnAssign) and node.target.id in engine_fields}
    assert written == {name: f"ENGINE.{name}" for name in engine_fields}
    assert Settings().engine_options() == EngineOptions()
