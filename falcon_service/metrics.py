"""Prometheus metrics of the engine, served at BentoML's `/metrics` beside its own.

prometheus_client is imported when `ServiceMetrics` is built (in the worker, after BentoML has
set up its multiprocess directory), never at module import.
"""

from __future__ import annotations

from .engine.engine import RequestRecord

PREFIX = "falcon_"
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
        self._prefix_tokens = prom.Gauge(f"{PREFIX}prefix_cache_tokens",
                                         "KV-cache tokens of finished sequences kept for reuse",
                                         labels, multiprocess_mode="livemax", **kw).labels(model_name)
        self._queried = prom.Counter(f"{PREFIX}prefix_cache_queries",
                                     "Prompt tokens looked up in the prefix cache", labels, **kw).labels(model_name)
        self._hits = prom.Counter(f"{PREFIX}prefix_cache_hits",
                                  "Prompt tokens found in the prefix cache (not computed)", labels, **kw
                                  ).labels(model_name)
        self._hit_rate = prom.Gauge(f"{PREFIX}prefix_cache_hit_rate",
                                    "Share of prompt tokens found in the prefix cache since the start",
                                    labels, multiprocess_mode="livemax", **kw).labels(model_name)
        self._queried_total = self._hits_total = 0
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

    def on_step(self, waiting: int, running: int, cache_tokens: int, prefix_tokens: int) -> None:
        self._waiting.set(waiting)
        self._running.set(running)
        self._cache.set(cache_tokens)
        self._prefix_tokens.set(prefix_tokens)

    def on_request_done(self, record: RequestRecord) -> None:
        self._prompt.inc(record.prompt_tokens)
        self._queried.inc(record.prompt_tokens)
        self._hits.inc(record.cached_tokens)
        self._queried_total += record.prompt_tokens
        self._hits_total += record.cached_tokens
        if self._queried_total:
            self._hit_rate.set(self._hits_total / self._queried_total)
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
