"""Loading: the serving dtype, the memory check made before any weight is read, weights held once on CPU."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from falcon_service.checkpoints import PRESETS, falcon_config
from falcon_service.engine.falcon import FalconRunner
from falcon_service.engine.loader import (
    DeviceUnavailableError,
    InsufficientMemoryError,
    checkpoint_parameters,
    choose_dtype,
    estimate_memory,
    load_model,
    resolve_device,
)

GIB = 2**30
# Falcon-7B's tensors (tiiuae/falcon-7b-instruct): embedding 65024 x 4544, 32 layers, lm_head tied
FALCON_7B = {
    "transformer.word_embeddings.weight": [65024, 4544],
    "transformer.ln_f.weight": [4544], "transformer.ln_f.bias": [4544],
    **{f"transformer.h.{i}.{name}": shape for i in range(32) for name, shape in {
        "input_layernorm.weight": [4544], "input_layernorm.bias": [4544],
        "self_attention.query_key_value.weight": [4672, 4544], "self_attention.dense.weight": [4544, 4544],
        "mlp.dense_h_to_4h.weight": [18176, 4544], "mlp.dense_4h_to_h.weight": [4544, 18176],
    }.items()},
}


@pytest.fixture
def falcon_7b_headers(tmp_path: Path) -> Path:
    """A Falcon-7B checkpoint directory whose weight file holds only its safetensors header (no data)."""
    config = falcon_config(PRESETS["7b"], eos_token_id=11)
    config.save_pretrained(tmp_path)
    header, offset = {}, 0
    for name, shape in FALCON_7B.items():
        size = 2 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    return tmp_path


def test_parameters_are_counted_from_the_safetensors_headers(tiny_checkpoint, tiny_model, falcon_7b_headers):
    assert checkpoint_parameters(tiny_checkpoint) == sum(p.numel() for p in tiny_model.parameters())
    assert checkpoint_parameters(falcon_7b_headers) == 6_921_720_704  # Falcon-7B


@pytest.mark.parametrize("setting,device,stored,fast_bf16,fp32_fits,expected", [
    ("auto", "cuda", "bfloat16", False, True, torch.bfloat16),
    ("auto", "cuda", "float32", False, True, torch.bfloat16),
    ("auto", "cpu", "float32", True, True, torch.float32),  # the random test checkpoints
    ("auto", "cpu", "bfloat16", True, True, torch.bfloat16),  # Falcon-7B on a CPU with AVX512-BF16 / AMX
    ("auto", "cpu", "bfloat16", False, True, torch.float32),  # no fast bf16 matmuls, and float32 fits
    ("auto", "cpu", "bfloat16", False, False, torch.bfloat16),  # slow, but float32 would not fit
    ("auto", "cpu", None, False, True, torch.float32),
    ("float16", "cuda", "bfloat16", True, True, torch.float16),
    ("float32", "cpu", "bfloat16", True, False, torch.float32),  # asked for: the memory check decides
])
def test_serving_dtype(setting, device, stored, fast_bf16, fp32_fits, expected):
    assert choose_dtype(setting, device, stored, fast_bf16, fp32_fits) == expected


def test_falcon_7b_as_float32_on_a_24_gib_machine_is_refused_before_loading(falcon_7b_headers):
    config = json.loads((falcon_7b_headers / "config.json").read_text())
    from transformers import FalconConfig

    config = FalconConfig(**config)
    fp32 = estimate_memory(falcon_7b_headers, config, "cpu", torch.float32, 2048, available=24 * GIB)
    assert 27.6e9 < fp32.weight_bytes < 29e9  # 27.7 GB of weights, + the packed output projection
    assert not fp32.fits
    with pytest.raises(InsufficientMemoryError) as err:
        fp32.check()
    message = str(err.value)
    assert "FALCON_DTYPE=bfloat16" in message and "FALCON_MAX_BATCH_TOKENS" in message
    assert "24.0 GiB is free" in message and "float32" in message

    bf16 = estimate_memory(falcon_7b_headers, config, "cpu", torch.bfloat16, 2048, available=24 * GIB)
    assert bf16.fits and bf16.needed_bytes < 17 * GIB
    bf16.check()
    # a KV budget too large for what is left is refused too, naming the setting
    huge = estimate_memory(falcon_7b_headers, config, "cuda", torch.bfloat16, 2048 * 5000, available=78 * GIB)
    with pytest.raises(InsufficientMemoryError, match="FALCON_MAX_BATCH_TOKENS \\(now 10240000\\)"):
        huge.check()


def test_prepacked_weights_replace_the_originals(tiny_checkpoint, tiny_model, device):
    if device != "cpu":
        pytest.skip("prepacking is the CPU's (oneDNN); on a GPU the weights are used as they are")
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()  # its own copy
    prompt = [5, 6, 7, 8]
    with torch.inference_mode():
        expected = tiny_model(torch.tensor([prompt])).logits[0, -1]
    runner = FalconRunner(model, batch_rows=2, max_len=64, release_weights=True)
    layer = model.transformer.h[0]
    assert layer.self_attention.query_key_value.weight is None and layer.mlp.dense_4h_to_h.weight is None
    assert sum(p.numel() for p in model.transformer.h.parameters()) == sum(
        2 * model.config.hidden_size for _ in model.transformer.h)  # only the layer norms are left
    torch.testing.assert_close(runner.prefill([0], [prompt], [0])[0], expected, atol=1e-4, rtol=0)


def test_load_model_puts_the_weights_on_the_device(tiny_checkpoint, device):
    model, tokenizer = load_model(tiny_checkpoint, device, torch.float32)
    assert model.device.type == torch.device(device).type and model.dtype == torch.float32
    assert tokenizer.eos_token_id is not None


@pytest.mark.parametrize("setting,cuda,driver,expected", [
    ("auto", True, "580.65.06", "cuda"),
    ("auto", False, None, "cpu"),  # no GPU at all: the CPU, as asked
    ("cpu", True, "580.65.06", "cpu"),
    ("cuda", True, "590.1", "cuda"),
])
def test_device_resolution(setting, cuda, driver, expected):
    assert resolve_device(setting, cuda, driver) == expected


def test_a_gpu_that_torch_cannot_use_is_an_error_not_a_silent_cpu_fallback():
    with pytest.raises(DeviceUnavailableError, match=r"driver 535.129.03.*R580.*FALCON_DEVICE=cpu"):
        resolve_device("auto", cuda_available=False, driver="535.129.03")
    with pytest.raises(DeviceUnavailableError, match="no NVIDIA driver"):
        resolve_device("cuda", cuda_available=False, driver=None)


def test_the_driver_version_is_read_from_the_kernel_module(tmp_path, monkeypatch):
    from falcon_service.engine import loader

    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build  "
                       "(dvs-builder@U22-I3-AF03-09-1)  Tue Sep 23 09:53:42 UTC 2025\nGCC version:  gcc 12\n")
    real_path = loader.Path
    monkeypatch.setattr(loader, "Path", lambda p: version if p == "/proc/driver/nvidia/version" else real_path(p))
    assert loader.nvidia_driver() == "580.95.05"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.129.03  Thu Oct 19 18:56:32 UTC 2023\n")
    assert loader.nvidia_driver() == "535.129.03"


@pytest.mark.parametrize("setting, expected, idle", [(None, 128, 512), (300, 300, 300)])
def test_a_cpu_engine_prefills_128_prompt_tokens_per_step_unless_told(tiny_checkpoint, setting, expected, idle):
    """On a CPU a step's time grows with its prompt tokens: the default budget keeps steps short there, and a
    long prompt's chunks are longer while nothing decodes; a budget that is set holds for those too."""
    from falcon_service.engine.loader import load_engine
    from falcon_service.engine.options import EngineOptions, default_prefill_tokens

    assert (default_prefill_tokens("cpu"), default_prefill_tokens("cuda")) == (128, 512)
    engine = load_engine(tiny_checkpoint, EngineOptions(device="cpu", dtype="float32", max_batch_size=2,
                                                        max_batch_tokens=4096, max_prefill_tokens=setting))
    try:
        assert engine.limits.max_prefill_tokens == expected
        assert engine.scheduler.limits.max_prefill_tokens == expected
        assert engine.limits.chunk_tokens(decoding=0) == idle
        assert engine.limits.chunk_tokens(decoding=1) == expected
    finally:
        engine.shutdown()


def test_the_batch_size_defaults_to_the_device_s(tiny_checkpoint):
    """256 sequences on a GPU (a decode step reads the weights once for all rows), 64 on a CPU; a set size holds."""
    from falcon_service.engine.loader import load_engine
    from falcon_service.engine.options import EngineOptions, default_batch_size

    assert (default_batch_size("cpu"), default_batch_size("cuda")) == (64, 256)
    for setting, expected in ((None, 64), (3, 3)):
        engine = load_engine(tiny_checkpoint, EngineOptions(device="cpu", dtype="float32", max_batch_size=setting,
                                                            max_batch_tokens=2048 * 128, prefix_caching=False))
        try:
            assert engine.limits.max_batch_size == expected
        finally:
            engine.shutdown()


def test_the_attention_setting_reaches_the_runner_and_varlen_needs_triton(tiny_checkpoint, monkeypatch):
    from falcon_service.config import Settings
    from falcon_service.engine import varlen_attention
    from falcon_service.engine.loader import load_engine

    options = Settings.from_env({"FALCON_ATTENTION": "varlen", "FALCON_DEVICE": "cpu", "FALCON_DTYPE": "float32",
                                 "FALCON_MAX_BATCH_SIZE": "2", "FALCON_MAX_BATCH_TOKENS": "4096"}).engine_options()
    assert options.attention == "varlen" and Settings.from_env({}).engine_options().attention == "split"
    monkeypatch.setattr(varlen_attention, "available", lambda: False)
    with pytest.raises(ValueError, match="Triton"):
        load_engine(tiny_checkpoint, options)
    monkeypatch.setattr(varlen_attention, "available", lambda: True)  # (the kernel is built at its first call)
    engine = load_engine(tiny_checkpoint, options)
    try:
        assert engine._runner.attention == "varlen"
    finally:
        engine.shutdown()


def test_the_fused_ops_setting_reaches_the_runner(tiny_checkpoint):
    from falcon_service.config import Settings
    from falcon_service.engine.loader import load_engine

    env = {"FALCON_DEVICE": "cpu", "FALCON_DTYPE": "float32", "FALCON_MAX_BATCH_SIZE": "2",
           "FALCON_MAX_BATCH_TOKENS": "4096"}
    assert Settings.from_env(env).engine_options().fused_ops is False
    engine = load_engine(tiny_checkpoint, Settings.from_env({**env, "FALCON_FUSED_OPS": "true"}).engine_options())
    try:
        assert engine._runner.fused_ops is True
    finally:
        engine.shutdown()
