"""Stop a server with a stream in flight and check that the stream's whole reply arrived.

    python deploy/image/drain_check.py URL --model MODEL --max-tokens N [--api-key KEY] -- STOP COMMAND...

opens a streamed chat completion of exactly N tokens (`ignore_eos`), waits for its first chunk, runs the
stop command (scripts/image_check.sh: `podman stop -t 70 CONTAINER`, which sends SIGTERM and waits), and
reads the stream to its end. It passes only if every token came: a finish chunk with finish_reason
"length", usage of N completion tokens, no error event, then `data: [DONE]`. A stream that the drain
cap (FALCON_DRAIN_TIMEOUT) cut ends with an error event ("the engine is shutting down") before
`[DONE]`: that fails, saying how many tokens had come. Exit status 0 on a whole reply, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Reply:
    """What a streamed chat completion delivered."""

    chunks: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    completion_tokens: int | None = None
    errors: list[str] = field(default_factory=list)
    done: bool = False
    after_done: int = 0  # data lines after [DONE] (none allowed)

    def add(self, data: str) -> None:
        if data == "[DONE]":
            self.done = True
            return
        if self.done:
            self.after_done += 1
        event = json.loads(data)
        if "error" in event:
            self.errors.append(event["error"].get("message", str(event["error"])))
            return
        self.chunks += 1
        self.finish_reasons += [c["finish_reason"] for c in event.get("choices", []) if c.get("finish_reason")]
        if event.get("usage"):
            self.completion_tokens = event["usage"]["completion_tokens"]

    def problems(self, max_tokens: int) -> list[str]:
        """Why the reply is not whole (empty when it is)."""
        found = [f"error event: {e!r}" for e in self.errors]
        if self.finish_reasons != ["length"]:
            found.append(f"finish reasons {self.finish_reasons}, not one 'length'")
        if self.completion_tokens != max_tokens:
            found.append(f"{self.completion_tokens} completion tokens, not {max_tokens}")
        if not self.done:
            found.append("no data: [DONE]")
        if self.after_done:
            found.append(f"{self.after_done} events after [DONE]")
        return found


def run(url: str, model: str, max_tokens: int, stop: list[str], api_key: str | None = None,
        timeout: float = 300.0) -> tuple[Reply, subprocess.CompletedProcess[str], float]:
    """The stream, the stop command's result, and the seconds from the stop to the stream's end."""
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me about falcons."}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    reply = Reply()
    with httpx.Client(base_url=url, timeout=timeout, headers=headers) as client, \
            client.stream("POST", "/v1/chat/completions", json=body) as stream:
        stream.raise_for_status()
        lines = (line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: "))
        reply.add(next(lines))  # the stream is under way: now stop the server
        stopping = subprocess.Popen(stop, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started = time.monotonic()
        for data in lines:
            reply.add(data)
        took = time.monotonic() - started
        out, _ = stopping.communicate(timeout=timeout)
    return reply, subprocess.CompletedProcess(stop, stopping.returncode, out, ""), took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--api-key")
    parser.add_argument("stop", nargs="+", help="the command that stops the server (after --)")
    args = parser.parse_args(argv)
    reply, stopped, took = run(args.url, args.model, args.max_tokens, args.stop, args.api_key)
    print(f"stream: {reply.chunks} chunks, finish {reply.finish_reasons}, {reply.completion_tokens} completion "
          f"tokens of {args.max_tokens}, [DONE] {'seen' if reply.done else 'missing'}; it ended {took:.1f} s after "
          f"the stop; `{' '.join(args.stop)}` exited {stopped.returncode}")
    problems = reply.problems(args.max_tokens)
    if stopped.returncode != 0:
        problems.append(f"the stop command failed: {stopped.stdout.strip()[-500:]}")
    for problem in problems:
        print(f"NOT WHOLE: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
