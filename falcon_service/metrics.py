"""Prometheus metrics of the engine, served at BentoML's `/metrics` beside its own.

prometheus_client is imported when `ServiceMetrics` is built (in the worker, after BentoML has
set up its multiprocess directory), never at module import.

The Gateway API Inference Extension's model server protocol (its proposal 003) asks for gauges of
queued requests, running requests and KV-cache utilization (a fraction, 0 to 1); endpoint pickers read
them under vLLM's names by default (`vllm:num_requests_waiting`, `vllm:num_requests_running`,
`vllm:kv_cache_usage_perc`, formerly `vllm:gpu_cache_usage_perc`; the optional `vllm:cache_config_info`
gives the prefix cache's block size), so the same values go out under those names beside ours.
"""

from __future__ import annotations

from .engine import RequestRecord

PREFIX = "falcon_"
VLLM = "vllm:"
PREFIX_BLOCK_TOKENS = 16  # the prefix cache's block (engine/prefix_cache.py): what a picker hashes by
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServiceMetrics:
    """An `EngineObserver` that records what the engine reports as Prometheus metrics."""

    def __init__(self, model_name: str, registry=None) -> None:
        import prometheus_client as prom

        kw = {"registry": registry} if registry is not None else {}
        labels = ["model_name"]
        self._waiting = prom.Gauge(f"{PREFIX}requests_waiting", "Requests waiting to be admitted",
                                   labels, multiprocess_mode="livemax", **kw).labels(model_name)
        self._running = prom.Gauge(f"{PREFIX}requests_running", "Sequences in the running batch",
                                   labels, multiprocess_mode="livemax", **kw).labels(model_name)
        self._cache = prom.Gauge(f"{PREFIX}kv_cache_tokens", "KV-cache tokens held by running sequences",
                                 labels, multiprocess_mode="livemax", **kw).labels(model_name)
        usage_help = "Fraction of the KV-cache budget held by running sequences (0 to 1; kept prefixes count as free)"
        self._usage = [prom.Gauge(name, usage_help, labels, multiprocess_mode="livemax", **kw).labels(model_name)
                       for name in (f"{PREFIX}kv_cache_usage_perc", f"{VLLM}kv_cache_usage_perc",
                                    f"{VLLM}gpu_cache_usage_perc")]
        self._vllm_waiting = prom.Gauge(f"{VLLM}num_requests_waiting", "Requests waiting to be admitted (= "
                                        f"{PREFIX}requests_waiting)", labels, multiprocess_mode="livemax", **kw
                                        ).labels(model_name)
        self._vllm_running = prom.Gauge(f"{VLLM}num_requests_running", "Sequences in the running batch (= "
                                        f"{PREFIX}requests_running)", labels, multiprocess_mode="livemax", **kw
                                        ).labels(model_name)
        self._cache_config = prom.Gauge(f"{VLLM}cache_config_info", "The KV cache's layout: block_size (tokens of "
                                        "a prefix-cache block), num_gpu_blocks (the budget in such blocks)",
                                        [*labels, "block_size", "num_gpu_blocks"], multiprocess_mode="livemax", **kw)
        self._capacity: int | None = None
        self._prefix_tokens = prom.Gauge(f"{PREFIX}prefix_cache_tokens",
                                         "KV-cache tokens of finished sequences kept for reuse",
                                         labels, multiprocess_mode="livemax", **kw).labels(model_name)
        # The hit rate's denominator is falcon_prompt_tokens: every prompt token is looked up (when prefix caching
        # is on), so a separate count of tokens looked up would always equal it (and claim lookups when it is off).
        self._hits = prom.Counter(f"{PREFIX}prefix_cache_hits",
                                  "Prompt tokens found in the prefix cache (not computed)", labels, **kw
                                  ).labels(model_name)
        self._hit_rate = prom.Gauge(f"{PREFIX}prefix_cache_hit_rate",
                                    "Share of prompt tokens found in the prefix cache since the start",
                                    labels, multiprocess_mode="livemax", **kw).labels(model_name)
        self._prompt_total = self._hits_total = 0
        self._ttft = prom.Histogram(f"{PREFIX}time_to_first_token_seconds", "Time from request to first token",
                                    labels, buckets=TTFT_BUCKETS, **kw).labels(model_name)
        self._tpot = prom.Histogram(f"{PREFIX}time_per_output_token_seconds", "Time per output token after the first",
                                    labels, buckets=TPOT_BUCKETS, **kw).labels(model_name)
        self._prompt = prom.Counter(f"{PREFIX}prompt_tokens", "Prompt tokens processed",
                                    labels, **kw).labels(model_name)
        self._generated = prom.Counter(f"{PREFIX}generation_tokens", "Tokens generated",
                                       labels, **kw).labels(model_name)
        self._finished = prom.Counter(f"{PREFIX}requests_finished", "Finished requests by finish reason",
                                      [*labels, "finish_reason"], **kw)
        self._rejected = prom.Counter(f"{PREFIX}requests_rejected", "Requests rejected because the queue was full",
                                      labels, **kw).labels(model_name)
        self._grammar_rejections = prom.Counter(
            f"{PREFIX}grammar_rejections", "Constrained replies failed because a sampled token broke their grammar "
            "(an engine fault; each is logged)", labels, **kw).labels(model_name)
        self._model_name = model_name

    def set_kv_capacity(self, tokens: int) -> None:
        """The KV-cache budget in tokens (the engine's `limits.max_batch_tokens`), known once the model is
        loaded: the denominator of the utilization gauges."""
        self._capacity = tokens
        self._cache_config.labels(self._model_name, str(PREFIX_BLOCK_TOKENS), str(tokens // PREFIX_BLOCK_TOKENS)).set(1)

    def on_step(self, waiting: int, running: int, cache_tokens: int, prefix_tokens: int) -> None:
        self._waiting.set(waiting)
        self._vllm_waiting.set(waiting)
        self._running.set(running)
        self._vllm_running.set(running)
        self._cache.set(cache_tokens)
        self._prefix_tokens.set(prefix_tokens)
        if self._capacity:
            usage = min(1.0, cache_tokens / self._capacity)
            for gauge in self._usage:
                gauge.set(usage)

    def on_request_done(self, record: RequestRecord) -> None:
        self._prompt.inc(record.prompt_tokens)
        self._hits.inc(record.cached_tokens)
        self._prompt_total += record.prompt_tokens
        self._hits_total += record.cached_tokens
        if self._prompt_total:
            self._hit_rate.set(self._hits_total / self._prompt_total)
        self._generated.inc(record.completion_tokens)
        self._finished.labels(self._model_name, record.finish_reason).inc()
        if record.time_to_first_token is not None:
            self._ttft.observe(record.time_to_first_token)
        if record.time_per_output_token is not None:
            self._tpot.observe(record.time_per_output_token)

    def on_rejected(self) -> None:
        self._rejected.inc()

    def on_grammar_rejection(self) -> None:
        self._grammar_rejections.inc()
