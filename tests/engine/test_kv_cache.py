"""The KV cache's sizing: bytes per token of Falcon's multi-query attention, and the default budget from free
memory."""

from __future__ import annotations

import torch

from falcon_service.engine import kv_cache


def test_default_kv_budget_comes_from_free_memory(tiny_model, monkeypatch):
    config, cpu = tiny_model.config, torch.device("cpu")
    per_token = kv_cache.kv_bytes_per_token(config, torch.float32)
    assert per_token == 2 * 2 * 1 * 64 * 4  # K and V, 2 layers, one KV head (multi-query), head_dim 64, fp32
    assert kv_cache.kv_bytes_per_token(config, torch.bfloat16) == per_token // 2
    monkeypatch.setattr(kv_cache, "available_host_memory", lambda: 1000 * 2048 * per_token)
    # half of free memory holds 500 full contexts: capped by the row limit, floored at one context
    assert kv_cache.default_kv_budget(config, torch.float32, cpu, 0.5, max_rows=64, max_len=2048) == 64 * 2048
    assert kv_cache.default_kv_budget(config, torch.float32, cpu, 0.5, max_rows=1000, max_len=2048) == 500 * 2048
    assert kv_cache.default_kv_budget(config, torch.float32, cpu, 1e-9, max_rows=64, max_len=2048) == 2048
