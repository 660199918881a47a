"""Loading a checkpoint onto its device and starting the engine over it: the dtype, a memory check
before any weight is read, the load, the KV budget.

The memory check exists because the alternative is bad: a Falcon-7B checkpoint loaded as float32
on a 24 GB CPU machine (27.7 GB of weights) froze the whole machine for 25 minutes, no error.
Parameter counts come from the safetensors headers (a few KB read), so the check costs nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from .falcon import FalconRunner, check_architecture, context_length
from .kv_cache import available_memory, default_kv_budget, kv_bytes_per_token
from .options import IDLE_PREFILL_TOKENS, EngineOptions, default_batch_size, default_prefill_tokens

log = logging.getLogger(__name__)

GIB = 2**30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


class InsufficientMemoryError(RuntimeError):
    """The model and its KV cache would not fit in the device's free memory."""


class DeviceUnavailableError(RuntimeError):
    """A GPU was expected (asked for, or present) but PyTorch cannot use it."""


DRIVER_FLOOR = 580  # torch 2.13's CUDA 13 build needs NVIDIA driver R580 or newer


def nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version, if one is loaded (what a container with a GPU sees)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", text)
    return found.group(1) if found else "unknown"


def resolve_device(setting: str, cuda_available: bool, driver: str | None) -> str:
    """`auto`: CUDA when PyTorch can use it, else the CPU, but never silently when a GPU is there: a
    driver that PyTorch cannot use is an error that says so (serving a 7B model on the CPU instead
    would look like a hang). `cuda` without CUDA is the same error."""
    if setting == "cpu":
        return "cpu"
    if cuda_available:
        return "cuda"
    if setting == "auto" and driver is None:
        return "cpu"
    import torch

    build = f"PyTorch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"
    if driver is None:
        raise DeviceUnavailableError(f"FALCON_DEVICE=cuda, but there is no NVIDIA driver: {build} sees no GPU. Run "
                                     "on a GPU node (with the NVIDIA container runtime), or set FALCON_DEVICE=cpu.")
    raise DeviceUnavailableError(
        f"A GPU is present (NVIDIA driver {driver}) but {build} cannot use it: this build needs driver R{DRIVER_FLOOR} "
        "or newer (or the container was started without the GPU's libraries). Upgrade the driver, or set "
        "FALCON_DEVICE=cpu to serve on the CPU on purpose.")


def describe_device(device: str) -> str:
    """What the log says about the device: versions of PyTorch, CUDA and the driver, the GPU and its memory."""
    import torch

    if device != "cuda":
        return f"CPU ({torch.backends.cpu.get_cpu_capability()}), PyTorch {torch.__version__}"
    props = torch.cuda.get_device_properties(0)
    return (f"{props.name} ({props.total_memory / GIB:.0f} GiB), PyTorch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, NVIDIA driver {nvidia_driver() or 'unknown'}")


def checkpoint_dtype(path: str | Path) -> str | None:
    """The dtype the checkpoint's config declares (`dtype`, or the older `torch_dtype`)."""
    config = json.loads((Path(path) / "config.json").read_text())
    value = config.get("dtype") or config.get("torch_dtype")
    return value if value in DTYPES else None


def checkpoint_parameters(path: str | Path) -> int:
    """Number of stored parameters, from the safetensors headers (or, for .bin weights, file sizes)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if files:
        total = 0
        for file in files:
            with file.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            for name, entry in header.items():
                if name != "__metadata__":
                    count = 1
                    for dim in entry["shape"]:
                        count *= dim
                    total += count
        return total
    stored = DTYPES.get(checkpoint_dtype(path) or "float32", torch.float32).itemsize
    return sum(f.stat().st_size for f in path.glob("pytorch_model*.bin")) // stored


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX), as oneDNN then does."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def choose_dtype(setting: str, device: str, stored: str | None, fast_bf16: bool, float32_fits: bool) -> torch.dtype:
    """The dtype to serve in. `auto`: bfloat16 on CUDA; on the CPU the checkpoint's own dtype (bfloat16
    for Falcon-7B), except float32 when the CPU lacks fast bf16 matmuls and float32 fits in memory."""
    if setting != "auto":
        return DTYPES[setting]
    if device == "cuda":
        return torch.bfloat16
    if stored in (None, "float32"):
        return torch.float32
    if fast_bf16 or not float32_fits:
        return torch.bfloat16
    return torch.float32


@dataclass(frozen=True)
class MemoryEstimate:
    """What serving a checkpoint needs on a device, against what the device has free."""

    device: str
    dtype: torch.dtype
    weight_bytes: int
    kv_bytes: int
    kv_tokens: int
    overhead_bytes: int
    available_bytes: int

    @property
    def needed_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.available_bytes

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"about {self.needed_bytes / GIB:.1f} GiB on {self.device} (weights {self.weight_bytes / GIB:.1f} GiB "
                f"in {dtype}, KV cache {self.kv_bytes / GIB:.1f} GiB for {self.kv_tokens} tokens, working memory "
                f"{self.overhead_bytes / GIB:.1f} GiB); {self.available_bytes / GIB:.1f} GiB is free")

    def check(self) -> None:
        """Raise `InsufficientMemoryError`, naming the settings that help, when it does not fit."""
        if self.fits:
            return
        hints = []
        if self.dtype == torch.float32:
            hints.append("FALCON_DTYPE=bfloat16 halves the weights")
        hints.append(f"a smaller FALCON_MAX_BATCH_TOKENS (now {self.kv_tokens}) shrinks the KV cache")
        if self.device == "cpu":
            hints.append("on a machine with a GPU, FALCON_DEVICE=auto serves from it")
        raise InsufficientMemoryError(f"not loading the model: it needs {self.describe()}. " + "; ".join(hints) + ".")


def estimate_memory(path: str | Path, config, device: str, dtype: torch.dtype, kv_tokens: int,
                    available: int | None = None) -> MemoryEstimate:
    """Weights in `dtype`, a KV cache of `kv_tokens` (plus the staging and scratch rows), and working memory.

    On the CPU the linears are prepacked and their originals dropped (held once), but the output
    projection shares its weights with the embedding, so its packed copy comes on top.
    """
    weight_bytes = checkpoint_parameters(path) * dtype.itemsize
    if device == "cpu":
        weight_bytes += config.vocab_size * config.hidden_size * dtype.itemsize
    kv_bytes = (kv_tokens + 2 * context_length(config)) * kv_bytes_per_token(config, dtype)
    # activations of the largest step and the logits: a few hundred MiB for Falcon-7B at 64 rows
    overhead = GIB // 2 + weight_bytes // 20
    if available is None:
        available = available_memory(torch.device(device))
    return MemoryEstimate(device, dtype, weight_bytes, kv_bytes, kv_tokens, overhead, available)


def load_model(path: str | Path, device: str, dtype: torch.dtype):
    """The model straight onto `device` (a device map: no full host copy on the way to a GPU) and its
    tokenizer; logs how long it took."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device).eval()
    log.info("loaded %s as %s on %s in %.1f s", path, str(dtype).removeprefix("torch."), device,
             time.perf_counter() - start)
    return model, tokenizer


def load_engine(path: str | Path, options: EngineOptions, observer=None):
    """Check, load and start: returns a ready `Engine` (decode graphs captured), or raises saying why not."""
    import torch
    from transformers import AutoConfig

    from .engine import Engine
    from .scheduler import BatchLimits

    started = time.perf_counter()
    config = AutoConfig.from_pretrained(path)
    check_architecture(config)
    device = resolve_device(options.device, torch.cuda.is_available(), nvidia_driver())
    log.info("device: %s", describe_device(device))
    max_len = context_length(config)
    # before reading any weight: will they and the smallest KV cache fit? (else fail now, saying why)
    kv_tokens = options.max_batch_tokens or max_len
    float32_fits = estimate_memory(path, config, device, torch.float32, kv_tokens).fits
    dtype = choose_dtype(options.dtype, device, checkpoint_dtype(path), cpu_has_fast_bf16(), float32_fits)
    estimate = estimate_memory(path, config, device, dtype, kv_tokens)
    log.info("%s needs %s", path, estimate.describe())
    estimate.check()
    model, tokenizer = load_model(path, device, dtype)
    # with prefix caching the pool holds up to as many finished prefixes as running sequences
    batch_size = options.max_batch_size or default_batch_size(device)
    pool_rows = batch_size * (2 if options.prefix_caching else 1)
    budget = options.max_batch_tokens or default_kv_budget(
        model.config, model.dtype, model.device, options.kv_cache_memory_fraction, pool_rows, max_len)
    prefill_tokens = options.max_prefill_tokens or default_prefill_tokens(device)
    idle_tokens = None if options.max_prefill_tokens else IDLE_PREFILL_TOKENS
    limits = BatchLimits(batch_size, budget, prefill_tokens, options.max_queue_size, idle_tokens)
    threads = options.torch_threads or len(os.sched_getaffinity(0))
    engine = Engine(model, tokenizer, limits, observer=observer,
                    runner_factory=partial(FalconRunner, release_weights=True, attention=options.attention,
                                           fused_ops=options.fused_ops),
                    threads=threads if device == "cpu" else None, cuda_graphs=options.cuda_graphs and device == "cuda",
                    prefix_caching=options.prefix_caching,
                    grammar_limits=options.grammar_limits())
    engine.grammars.start()  # the compile sandboxes, so that the first constrained request does not wait for them
    if engine.graphs is not None:
        log.info("captured decode graphs in %.1f s", engine.capture_graphs())
    log.info("ready on %s (%s) in %.1f s; KV budget %d tokens in %d rows; %d prompt tokens per step", device,
             str(dtype).removeprefix("torch."), time.perf_counter() - started, budget, engine.limits.max_batch_size,
             prefill_tokens)
    return engine
