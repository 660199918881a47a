"""What the engine can be told, and what it does when it is not: `EngineOptions` and the defaults by device.

The one place of the engine's defaults: `loader.load_engine` applies them, and the service's settings
(`falcon_service/config.py`) take their defaults and descriptions from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .grammar_source import GrammarLimits

# Prompt tokens one engine step prefills, by device, unless set. On a CPU a step's time grows with its
# tokens (it is bound by compute): a 512-token prefill makes a step last as long as ten decode steps of
# 16 streams, which every running stream waits through, and admits arrivals in groups that then finish
# and come back together. Steps of 128 keep the streams flowing and spread the arrivals out (measured
# with 16 clients sharing a 1,024-token prefix: TTFT p50 131 ms against 363-413 ms at 512, output
# tok/s within 3-5%). On a GPU a decode step is bound by reading the weights, and 512 prompt tokens
# add little to it.
DEFAULT_PREFILL_TOKENS = {"cpu": 128, "cuda": 512}
# A long prompt's chunks while no row decodes (no stream waits on them), by default: on a CPU, chunks of
# 512 prefill a lone 1,900-token prompt in 645-708 ms against 745-830 ms in chunks of 128 (medians of four,
# two sessions), a 600-token one in 191 against 226 ms. A budget that is set holds for these chunks too.
IDLE_PREFILL_TOKENS = 512


def default_prefill_tokens(device: str) -> int:
    return DEFAULT_PREFILL_TOKENS["cpu" if device == "cpu" else "cuda"]


# Sequences decoding together, by device, unless set. On a GPU a decode step reads the weights once for all
# its rows: more rows cost little until attention's reads of the KV cache catch up (vLLM defaults to 256; a
# Falcon-7B row is 16 MiB of bf16 KV cache, so 256 rows, and as many kept prefixes, take 8 GiB). On a CPU a
# step's time grows with its rows (the measured workloads peak around 16-32 clients).
DEFAULT_BATCH_SIZE = {"cpu": 64, "cuda": 256}


def default_batch_size(device: str) -> int:
    return DEFAULT_BATCH_SIZE["cpu" if device == "cpu" else "cuda"]


@dataclass(frozen=True)
class EngineOptions:
    """How to load and run a model. Its defaults are the engine's, and the only ones: the service's `Settings`
    take theirs from here."""

    device: str = "auto"  # auto: CUDA when present
    dtype: str = "auto"  # see `choose_dtype`
    max_batch_size: int | None = None  # default: `default_batch_size(device)`
    max_batch_tokens: int | None = None  # default: from free memory
    kv_cache_memory_fraction: float = 0.5
    max_prefill_tokens: int | None = None  # default: `default_prefill_tokens(device)`
    max_queue_size: int = 256
    torch_threads: int | None = None  # CPU: default all usable cores
    cuda_graphs: bool = True
    prefix_caching: bool = True
    grammar_compile_seconds: float = 3.0
    grammar_memory_mb: int = 1024
    # a step's attention: "split" (SDPA's kernels for decode rows and prompt segments apart) or "varlen" (one
    # Triton kernel for all of a step's tokens, a GPU's; chosen by the GPU check's measurement, not yet made)
    attention: str = "split"
    # a layer's small ops (rotary; the residual adds with the next layer norm) compiled into fewer kernels
    # (`FalconRunner(fused_ops=True)`): off until the GPU check's measurement says it pays
    fused_ops: bool = False
    # the engine core (model, scheduler, step loop) in a child process of its own, its GIL its own
    # (`process.EngineProcess`); off until the GPU check measures it
    engine_process: bool = False

    def grammar_limits(self) -> GrammarLimits:
        """What one grammar may ask of the server, from these options (the engine's compiler and, with the engine in
        a process of its own, the server's)."""
        return GrammarLimits(compile_seconds=self.grammar_compile_seconds, memory_bytes=self.grammar_memory_mb << 20)
