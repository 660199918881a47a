"""The engine core in a process of its own (`FALCON_ENGINE_PROCESS`): its step loop keeps a GIL to itself.

In one process the step loop's thread and the event loop (HTTP, SSE chunks, the caller's accounting) share one
GIL: `benchmarks/host_overhead.py` measured 15 ms of host work a step at 256 streams on the 2-core development
machine, twice a GPU's decode step (benchmarks/RESULTS-gpu.md). Here the child process owns the model, the KV
cache, the scheduler and the step loop (sampling, detokenizing and stop strings stay with the step loop, where
the next step needs them); the server's process keeps HTTP, SSE, tokenizing prompts, compiling grammars (the
bounds and the sandbox: what a request makes the server compile is checked before it reaches the child) and each
request's accounting (usage, metrics' records).

`EngineProcess` has the face of `Engine` that `EngineClient` uses (submit, the streams' aborts, stats, alive,
shutdown, the model's limits, the tokenizer, the grammar compiler), so callers see no difference. Messages go
over a socket pair as pickles (`multiprocessing.connection`):

- to the child: ("submit", id, request without its grammar, the grammar's spec), ("abort", id), ("shutdown",);
- to the server: ("ready", limits) or ("failed", reason) once, then a step's events in one message
  ("events", [(id, events or the error, cached prompt tokens)], the step loop's vital signs), ("step", counts,
  when) for the metrics, the vital signs and counts twice a second ("alive", `Liveness`, counts, when), and
  ("grammar_rejection",).

A dead child (a crash, the OOM killer) closes the socket: every request in flight ends with an error at once and
`alive` says so, so the pod's liveness probe fails and Kubernetes restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .engine import Engine, Liveness, check_request, judge_liveness
from .grammar import GrammarCompiler
from .options import EngineOptions
from .request import EngineError, EngineObserver, GenerationRequest, RequestRecord
from .scheduler import BatchLimits, QueueFullError
from .stream import Outbox, RequestStream, send

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 0.5
SILENCE_SECONDS = 30.0  # no word from a running child for this long: it is hung (its heartbeat thread too)


class EngineStartError(RuntimeError):
    """The engine process could not load the model; the message is its reason."""


class EngineProcess:
    """The server's side of an engine running in a child process (`start`)."""

    def __init__(self, proc: subprocess.Popen, conn: Connection, ready: dict[str, Any], tokenizer,
                 grammars: GrammarCompiler, observer: EngineObserver | None) -> None:
        self._proc, self._conn = proc, conn
        self.tokenizer = tokenizer
        self.grammars = grammars
        self.observer = observer
        self.max_model_len: int = ready["max_model_len"]
        self.vocab_size: int = ready["vocab_size"]
        self.limits: BatchLimits = ready["limits"]
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # the streams' tables and the socket's sending end
        self._streams: dict[int, RequestStream] = {}  # by the id the child knows them by
        self._waiting: set[int] = set()  # submitted, no event yet
        self._stats = {"waiting": 0, "running": 0, "cache_tokens": 0, "prefix_tokens": 0}
        self._stats_at = 0.0  # when the child took them (the monotonic clock is the machine's)
        self._signs = Liveness(True, 0, False, 0.0)
        self._heard = time.monotonic()
        self._dead: str | None = None
        self._stopping = False
        self._reader = threading.Thread(target=self._read, name="falcon-engine-process", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, path: str | Path, options: EngineOptions, observer: EngineObserver | None = None) -> EngineProcess:
        """Start the child, have it load the model, and wait until it is ready (minutes for Falcon-7B); raises
        `EngineStartError` with the child's reason when it cannot load."""
        from transformers import AutoTokenizer

        ours, theirs = socket.socketpair()
        # a session of its own: a terminal's Ctrl-C to the server's group does not reach it (see `child_main`)
        root = str(Path(__file__).resolve().parents[2])  # where `falcon_service` is imported from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        proc = subprocess.Popen([sys.executable, "-m", "falcon_service.engine.process", str(theirs.fileno())],
                                pass_fds=(theirs.fileno(),), env=env, start_new_session=True)
        theirs.close()
        conn = Connection(ours.detach())
        try:
            conn.send(("start", str(path), replace(options, engine_process=False)))
            message = cls._wait_ready(proc, conn)
            if message[0] != "ready":
                raise EngineStartError(message[1])
            tokenizer = AutoTokenizer.from_pretrained(path)
        except BaseException:
            conn.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        grammars = GrammarCompiler(tokenizer, options.grammar_limits())
        grammars.start()
        log.info("engine process %d ready", proc.pid)
        return cls(proc, conn, message[1], tokenizer, grammars, observer)

    @staticmethod
    def _wait_ready(proc: subprocess.Popen, conn: Connection) -> tuple:
        """The child's first word: ("ready", limits) or ("failed", reason), however it ends."""
        while True:
            if conn.poll(1.0):
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    return ("failed", f"the engine process ended while loading (exit code {proc.wait()})")
                return message
            if proc.poll() is not None:
                return ("failed", f"the engine process ended while loading (exit code {proc.returncode})")

    # ---- the caller's side (any event loop) ----

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request in the child; raises `QueueFullError` when as many wait as the queue holds, and
        `InvalidRequest` for what the engine cannot serve, at once (as `Engine.submit`)."""
        check_request(request, self.max_model_len, self.limits.max_batch_size)
        loop = asyncio.get_running_loop()
        grammar = request.params.grammar
        plain = replace(request, params=replace(request.params, grammar=None))
        with self._lock:
            if self._dead is not None:
                raise EngineError("the engine process has ended")
            if len(self._waiting) >= self.limits.max_queue_size:
                if self.observer is not None:
                    self.observer.on_rejected()
                raise QueueFullError(f"{len(self._waiting)} requests are waiting")
            rid = next(self._ids)
            stream = RequestStream(request, loop, partial(self._abort, rid), self.observer)
            self._streams[rid] = stream
            self._waiting.add(rid)
            self._send(("submit", rid, plain, grammar.spec if grammar is not None else None))
        return stream

    def _abort(self, rid: int, _stream: RequestStream) -> None:
        with self._lock:
            if rid in self._streams and self._dead is None:
                self._send(("abort", rid))

    def _send(self, message: tuple) -> None:
        """Send to the child (holding `_lock`); a child that is gone is the reader's to report."""
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(message)

    def stats(self) -> dict[str, int]:
        """The child's counts at its last step or heartbeat."""
        return dict(self._stats)

    def alive(self, stall_seconds: float = 60.0, max_failed_steps: int = 3) -> tuple[bool, str]:
        """`Engine.alive` of the child, by its last heartbeat; not alive once it has ended or gone silent."""
        if self._dead is not None:
            return False, self._dead
        silent = time.monotonic() - self._heard
        if silent > max(SILENCE_SECONDS, 10 * HEARTBEAT_SECONDS):
            return False, f"the engine process has not answered for {silent:.0f} s"
        signs = replace(self._signs, since_step=self._signs.since_step + silent)
        return judge_liveness(signs, stall_seconds, max_failed_steps)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the child (every request it holds ends with an error) and wait for it; killed if it hangs."""
        self._stopping = True
        with self._lock:
            self._send(("shutdown",))
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout)
        self.grammars.close()

    # ---- the reader thread ----

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError, pickle.UnpicklingError, TypeError, ValueError):  # closed, here or there
                break
            kind = message[0]
            if kind == "events":
                if message[2] is not None:
                    self._heard, self._signs = time.monotonic(), message[2]
                self._deliver(message[1])
            elif kind == "step":
                self._heard = time.monotonic()
                self._take_stats(message[1], message[2])
                if self.observer is not None:
                    self.observer.on_step(**message[1])
            elif kind == "alive":
                self._heard, self._signs = time.monotonic(), message[1]
                self._take_stats(message[2], message[3])
            elif kind == "grammar_rejection" and self.observer is not None:
                self.observer.on_grammar_rejection()
        code = self._proc.wait()
        reason = "the engine is shutting down" if self._stopping else \
            f"the engine process has ended (exit code {code})"
        if not self._stopping:
            log.error("%s; the requests in flight fail", reason)
        with self._lock:
            self._dead = reason
            streams, self._streams, self._waiting = list(self._streams.values()), {}, set()
        outbox: Outbox = {}
        for stream in streams:
            if not stream.ended:
                stream.deliver(EngineError(reason), outbox)
        send(outbox)

    def _take_stats(self, stats: dict[str, int], taken_at: float) -> None:
        """The child's counts, unless newer ones came first (a heartbeat's may cross a step's on the way)."""
        if taken_at >= self._stats_at:
            self._stats, self._stats_at = stats, taken_at

    def _deliver(self, items: list[tuple[int, Any, int]]) -> None:
        """A step's events from the child, to their streams' event loops (one hand-over per loop)."""
        outbox: Outbox = {}
        with self._lock:
            for rid, item, cached in items:
                stream = self._streams.get(rid)
                if stream is None:
                    continue
                self._waiting.discard(rid)
                stream.cached_tokens = cached
                stream.deliver(item, outbox)
                if stream.ended:
                    del self._streams[rid]
        send(outbox)


# ---------------------------------------------------------------- the child


class _Forwarder:
    """The child's end of the socket, for every thread that sends; in an `Outbox` it stands where an event loop
    would (`send` calls `call_soon_threadsafe`), so a step's events go out as one message."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.engine: Engine | None = None  # once loaded: its vital signs go with every event

    def send(self, message: tuple) -> None:
        with self._lock:
            self._conn.send(message)

    def events(self, items: list) -> None:
        """Events, with the step loop's vital signs as they are now: a step that failed is known to the server's
        liveness before its requests' errors are."""
        signs = self.engine.liveness() if self.engine is not None else None
        self.send(("events", items, signs))

    def call_soon_threadsafe(self, _put_all, items: list) -> None:
        self.events(items)


class _ForwardedStream(RequestStream):
    """A request in the child: its events go to the server's process, keyed by the id the server gave it."""

    def __init__(self, rid: int, request: GenerationRequest, forwarder: _Forwarder, engine: Engine,
                 streams: dict[int, _ForwardedStream]) -> None:
        self.rid, self._forwarder, self._streams = rid, forwarder, streams
        super().__init__(request, forwarder, engine._abort)  # type: ignore[arg-type]

    def deliver(self, item, outbox: Outbox | None = None) -> None:
        self._account(item)
        entry = (self.rid, item, self.cached_tokens)
        if self.ended:
            self._streams.pop(self.rid, None)
        if outbox is None:
            self._forwarder.events([entry])
        else:
            outbox.setdefault(self._forwarder, []).append(entry)  # type: ignore[arg-type]


class _ForwardingObserver:
    """The child's engine measurements, to the server's metrics (a request's record is made there)."""

    def __init__(self, forwarder: _Forwarder) -> None:
        self._forwarder = forwarder

    def on_step(self, waiting: int, running: int, cache_tokens: int, prefix_tokens: int) -> None:
        self._forwarder.send(("step", {"waiting": waiting, "running": running, "cache_tokens": cache_tokens,
                                       "prefix_tokens": prefix_tokens}, time.monotonic()))

    def on_request_done(self, record: RequestRecord) -> None:
        pass

    def on_rejected(self) -> None:
        pass

    def on_grammar_rejection(self) -> None:
        self._forwarder.send(("grammar_rejection",))


def _heartbeat(engine: Engine, forwarder: _Forwarder, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            forwarder.send(("alive", engine.liveness(), engine.stats(), time.monotonic()))
        except (OSError, ValueError):
            return


def child_main(fd: int) -> int:
    """The child: load the engine, then serve the server's messages until it says stop or goes away."""
    from .loader import load_engine

    # the server's supervisor (BentoML's) signals its workers' children too when it stops: this process stops when
    # the server says so, or when the server's end of the socket closes, after the server's own drain
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=os.environ.get("FALCON_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s [engine process] %(name)s: %(message)s")
    conn = Connection(fd)
    forwarder = _Forwarder(conn)
    _, path, options = conn.recv()
    try:
        engine = load_engine(path, options, observer=_ForwardingObserver(forwarder))  # type: ignore[arg-type]
    except Exception as exc:  # the reason goes to the server, which exits with it
        log.exception("loading the engine failed")
        forwarder.send(("failed", f"{type(exc).__name__}: {exc}"))
        return 3
    forwarder.engine = engine
    forwarder.send(("ready", {"max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size,
                              "limits": engine.limits}))
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(engine, forwarder, stop), name="falcon-heartbeat", daemon=True).start()
    streams: dict[int, _ForwardedStream] = {}
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break  # the server is gone
            if message[0] == "submit":
                _, rid, request, spec = message
                try:
                    if spec is not None:  # checked and compiled in the server already: here it comes from a cache
                        grammar = engine.grammars.compile(spec)
                        request = replace(request, params=replace(request.params, grammar=grammar))
                    stream = _ForwardedStream(rid, request, forwarder, engine, streams)
                    streams[rid] = stream
                    engine.enqueue(stream)
                except Exception as exc:  # the queue full after all, a grammar that failed here: the request's error
                    streams.pop(rid, None)
                    forwarder.events([(rid, exc if isinstance(exc, QueueFullError) else
                                       EngineError("the engine could not take the request"), 0)])
            elif message[0] == "abort":
                stream = streams.get(message[1])
                if stream is not None:
                    stream.abort()
            elif message[0] == "shutdown":
                break
    finally:
        stop.set()
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(child_main(int(sys.argv[1])))
