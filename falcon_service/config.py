"""Every setting in one typed object, read from `FALCON_*` environment variables.

The engine's settings take their defaults from the engine (`EngineOptions`, `engine/options.py`): one
place holds each default, here they are read from the environment and validated.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Literal

from pydantic import BaseModel, Field

from .engine import DEFAULT_BATCH_SIZE, DEFAULT_PREFILL_TOKENS, IDLE_PREFILL_TOKENS, EngineOptions

ENV_PREFIX = "FALCON_"
ENGINE = EngineOptions()  # the engine's defaults


class Settings(BaseModel):
    """Service settings; each field `x` is read from the environment variable `FALCON_X`."""

    model: str = Field("falcon-7b-instruct", description="BentoML model tag (name or name:version) to serve")
    bake_model: bool = Field(
        False, description="at `bentoml build`: put the model into the Bento and its image (air-gapped clusters); "
        "by default the service loads it from the store at BENTOML_HOME, a volume"
    )
    served_model_name: str | None = Field(None, description="model id clients send; default: the tag's name")
    device: Literal["auto", "cuda", "cpu"] = Field(
        ENGINE.device,  # type: ignore[arg-type]
        description="auto: CUDA when PyTorch can use it, else the CPU (an error when a GPU is there but unusable)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        ENGINE.dtype,  # type: ignore[arg-type]
        description="auto: bfloat16 on CUDA; on CPU the checkpoint's own dtype, but float32 where the CPU lacks fast "
        "bf16 matmuls and float32 fits")
    max_batch_size: int | None = Field(
        ENGINE.max_batch_size, ge=1,
        description=f"sequences decoding together (each of n choices counts); default: {DEFAULT_BATCH_SIZE['cuda']} on "
        "a GPU (where a decode step reads the weights once for all rows; a Falcon-7B row is 16 MiB of KV cache), "
        f"{DEFAULT_BATCH_SIZE['cpu']} on CPU (where a step's time grows with its rows)")
    max_batch_tokens: int | None = Field(
        ENGINE.max_batch_tokens, ge=1,
        description="KV-cache token budget (running sequences and cached prefixes); default: derived from free memory, "
        "up to twice max_batch_size contexts with prefix caching")
    kv_cache_memory_fraction: float = Field(
        ENGINE.kv_cache_memory_fraction, gt=0, le=0.95,
        description="share of free memory the default KV-cache budget may use")
    cuda_graphs: bool = Field(ENGINE.cuda_graphs, description="replay decode steps as CUDA graphs (GPU only)")
    prefix_caching: bool = Field(
        ENGINE.prefix_caching,
        description="reuse the KV cache of prompt prefixes already computed (shared system prompts, chat history)")
    torch_threads: int | None = Field(
        ENGINE.torch_threads, ge=1,
        description="CPU threads of the engine's torch work; default: all cores the process may use")
    max_prefill_tokens: int | None = Field(
        ENGINE.max_prefill_tokens, ge=1,
        description=f"prompt tokens prefilled per engine step; longer prompts go in chunks; default: "
        f"{DEFAULT_PREFILL_TOKENS['cpu']} on CPU (where a step's time grows with its tokens; a long prompt's chunks "
        f"{IDLE_PREFILL_TOKENS} while nothing decodes), {DEFAULT_PREFILL_TOKENS['cuda']} on a GPU")
    max_queue_size: int = Field(ENGINE.max_queue_size, ge=0, description="requests waiting for a batch slot before 429")
    grammar_compile_seconds: float = Field(
        ENGINE.grammar_compile_seconds, gt=0,
        description="longest a structured-output grammar (schema, regex, Lark, tools) may take to compile, in a "
        "sandbox process, before the request gets 400")
    grammar_memory_mb: int = Field(
        ENGINE.grammar_memory_mb, ge=64,
        description="memory one grammar compile may take, in the sandbox process (a 400 past it)")
    attention: Literal["split", "varlen"] = Field(
        ENGINE.attention,  # type: ignore[arg-type]
        description="a step's attention: `split` (SDPA's kernels, decode rows and prompt segments apart) or `varlen` "
        "(one Triton kernel for all of a step's tokens; GPU only, measured by scripts/gpu_check.sh)")
    engine_process: bool = Field(
        ENGINE.engine_process,
        description="run the engine core (the model, the scheduler, the step loop) in a child process of its own, so "
        "that HTTP and SSE work does not take the GIL from the loop that feeds the GPU; a dead child fails liveness")
    fused_ops: bool = Field(
        ENGINE.fused_ops,
        description="compile a layer's small ops (rotary positions; the residual adds with the next layer norm) "
        "into one kernel each with torch.compile (Triton on a GPU; needs a C++ compiler on a CPU): 4 kernel "
        "launches a layer fewer; the first steps of each shape compile (seconds); measured by scripts/gpu_check.sh")
    api_key: str | None = Field(
        None, description="when set, requests need `Authorization: Bearer <key>` (see api_key_scope); several keys "
        "separated by commas: each is a tenant whose prompts share cached prefixes only with its own"
    )
    api_key_scope: Literal["api", "all"] = Field(
        "api", description="what the key guards: `api` every path but the probes, /metrics and the docs; `all` "
        "every path but the probes (/livez, /readyz, /healthz, /health)"
    )
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="larger request bodies get 413 before they are read")
    body_timeout: float = Field(30.0, gt=0, description="seconds a request body may stall between chunks (then 408)")
    head_timeout: float = Field(
        15.0, gt=0, description="seconds a connection has to send a whole request head, after it opens or after "
        "its previous response (then it is closed)"
    )
    default_chat_stop: bool = Field(True, description=r"add `\nUser:` to chat requests' stop strings")
    timeout: int = Field(600, ge=1, description="BentoML traffic timeout in seconds")
    engine_stall_seconds: float = Field(
        120.0, gt=0, description="liveness: the engine is dead (and the pod restarted) once it has had work and "
        "finished no step for this long (a hung kernel), or after 3 failed steps in a row")
    drain_timeout: int | None = Field(
        None, ge=0, description="after SIGTERM, seconds requests in flight may take to finish (new ones get 503); "
        "default: the traffic timeout"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="level of the service's own log lines (model loading, aborted requests)"
    )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values = {name: env[ENV_PREFIX + name.upper()] for name in cls.model_fields if ENV_PREFIX + name.upper() in env}
        return cls.model_validate(values)

    @property
    def drain_seconds(self) -> int:
        return self.timeout if self.drain_timeout is None else self.drain_timeout

    @property
    def model_name(self) -> str:
        """The model id of the OpenAI API: `served_model_name`, else the store name of `model`."""
        return self.served_model_name or self.model.split(":", 1)[0]

    def engine_options(self) -> EngineOptions:
        """What the engine needs of these settings."""
        return EngineOptions(**{f.name: getattr(self, f.name) for f in fields(EngineOptions)})

    def torch_device(self, cuda_available: bool) -> str:
        return ("cuda" if cuda_available else "cpu") if self.device == "auto" else self.device
