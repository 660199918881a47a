"""A process that compiles grammars first, so that no grammar can take the server down.

Compiling a grammar can crash (a segfault inside the grammar engine), allocate gigabytes or take many
seconds (see `grammar_source.py`). A `CompileSandbox` runs each new spec through `build_matcher` in a
child process of its own, under a memory cap (RLIMIT_AS) and a deadline; only a spec that compiled there
is compiled again in the server, where the same deterministic work is then known to be bounded. A child
that crashed, ran out of memory or ran out of time is replaced; the request gets a 400 naming the limit.

The child (`python -m falcon_service.engine.grammar_sandbox`) imports llguidance and this package's
`grammar_source` only (no torch): it starts in well under a second, plus the tokenizer's build. Messages
are length-prefixed JSON over its stdin and stdout. Both sides compile on threads of the same stack size
(`STACK_BYTES`), so a grammar deep enough to overflow one overflows the other.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from .grammar_source import GrammarLimits, GrammarSpec, UnsupportedGrammar, build_matcher

STACK_BYTES = 16 << 20  # of every thread that builds a matcher, here and in the child
START_SECONDS = 60.0  # the child's start: the interpreter, llguidance and the tokenizer (0.7 s for 65k tokens)
_HEADER = struct.Struct(">I")
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
log = logging.getLogger(__name__)


def on_big_stack(fn, *args):
    """`fn(*args)` on a thread with a stack of `STACK_BYTES` (the size the sandbox compiles with); re-raises."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, fn(*args)))
        except BaseException as exc:  # handed to the caller
            result.append((False, exc))

    lock = _stack_lock
    with lock:
        previous = threading.stack_size(STACK_BYTES)
        try:
            thread = threading.Thread(target=run, name="grammar-compile", daemon=True)
            thread.start()
        finally:
            threading.stack_size(previous)
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


_stack_lock = threading.Lock()


def _write(stream, payload: dict) -> None:
    data = json.dumps(payload).encode()
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes | None:
    """`size` bytes from `fd`, or None at end of file; raises TimeoutError past `deadline` (monotonic)."""
    chunks, got = [], 0
    while got < size:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError
        chunk = os.read(fd, size - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read(fd: int, deadline: float | None = None) -> dict | None:
    header = _read_exactly(fd, _HEADER.size, deadline)
    if header is None:
        return None
    body = _read_exactly(fd, _HEADER.unpack(header)[0], deadline)
    return None if body is None else json.loads(body)


class CompileSandbox:
    """One child process that proves specs safe to compile; `check` is thread-safe (one spec at a time)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token: int | None, limits: GrammarLimits) -> None:
        self._hello = {"tokenizer": tokenizer_json, "n_vocab": vocab_size, "eos": eos_token,
                       "limits": asdict(limits)}
        self.limits = limits
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")])}
        child = subprocess.Popen([sys.executable, "-m", "falcon_service.engine.grammar_sandbox"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, close_fds=True)
        assert child.stdin is not None and child.stdout is not None
        try:
            _write(child.stdin, self._hello)
            ready = _read(child.stdout.fileno(), time.monotonic() + START_SECONDS)
        except (TimeoutError, OSError):
            ready = None
        if not ready or not ready.get("ready"):
            self._kill(child)
            raise RuntimeError(f"the grammar compile sandbox did not start ({ready})")
        return child

    @staticmethod
    def _kill(child: subprocess.Popen) -> None:
        if child.poll() is None:
            child.kill()
        child.wait()
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()

    def start(self) -> None:
        """Start the child now (else the first `check` does)."""
        with self._lock:
            if self._child is None or self._child.poll() is not None:
                self._child = self._start()

    def check(self, spec: GrammarSpec) -> None:
        """Compile `spec` in the child: returns if it compiled within the limits; raises `UnsupportedGrammar`
        saying why not (the grammar's own error, or the limit it broke)."""
        with self._lock:
            if self._child is None or self._child.poll() is not None:
                self._child = self._start()
            child = self._child
            assert child.stdin is not None and child.stdout is not None
            try:
                _write(child.stdin, {"kind": spec.kind, "source": spec.source})
                reply = _read(child.stdout.fileno(), time.monotonic() + self.limits.compile_seconds)
            except TimeoutError:
                self._kill(child)
                self._child = None
                log.warning("a grammar compile ran out of its %g s: refused, its sandbox replaced",
                            self.limits.compile_seconds)
                raise UnsupportedGrammar(f"compiling it took longer than {self.limits.compile_seconds:g} s, the limit "
                                         "(simplify it: fewer alternatives, patterns or repetitions)") from None
            except OSError:  # the child is gone (a broken pipe)
                reply = None
            if reply is None:
                self._kill(child)
                self._child = None
                log.warning("a grammar compile ended its sandbox (exit status %s): refused, the sandbox replaced",
                            child.returncode)
                raise UnsupportedGrammar(self._death(child.returncode)) from None
        if reply.get("error"):
            raise UnsupportedGrammar(reply["error"])

    def _death(self, returncode: int | None) -> str:
        if returncode == -signal.SIGSEGV:
            return "compiling it overflowed the grammar engine (it is nested or chained too deeply)"
        mib = self.limits.memory_bytes >> 20
        return f"compiling it needed more than {mib:,} MiB, the limit (bound its repetitions and sizes)"

    def close(self) -> None:
        with self._lock:
            if self._child is not None:
                self._kill(self._child)
                self._child = None


def _serve() -> None:
    """The child: build the tokenizer, cap the memory, then compile what comes until stdin closes."""
    import resource

    from llguidance import LLTokenizer

    fd_in, out = sys.stdin.buffer.fileno(), sys.stdout.buffer
    hello = _read(fd_in)
    if hello is None:
        return
    limits = GrammarLimits(**hello["limits"])
    tokenizer = LLTokenizer(hello["tokenizer"], n_vocab=hello["n_vocab"], eos_token=hello["eos"])
    # the cap: what the process maps now, plus what one compile may take
    mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cap = mapped + limits.memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    _write(out, {"ready": True})
    while (request := _read(fd_in)) is not None:
        spec = GrammarSpec(request["kind"], request["source"])
        try:
            on_big_stack(build_matcher, spec, tokenizer, limits)
            error = None
        except UnsupportedGrammar as exc:
            error = str(exc)
        except MemoryError:
            os._exit(70)  # reported as out of memory by the parent
        _write(out, {"error": error})


if __name__ == "__main__":
    _serve()
