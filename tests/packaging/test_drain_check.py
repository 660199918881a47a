"""scripts/image_check.sh's drain step (deploy/image/drain_check.py) against a real `bentoml serve`: SIGTERM
with a stream in flight, and the check passes only when the stream's whole reply came."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from served import REPO, Server, serve


def drain_check(server: Server, max_tokens: int) -> subprocess.CompletedProcess[str]:
    """scripts/image_check.sh's drain step, against a real server: SIGTERM to it with a stream in flight."""
    return subprocess.run([sys.executable, str(REPO / "deploy" / "image" / "drain_check.py"), server.url,
                           "--model", server.model, "--max-tokens", str(max_tokens), "--",
                           "kill", "-TERM", str(server.pid)], capture_output=True, text=True, timeout=300)


def test_the_drain_check_sees_a_whole_reply(store: tuple[Path, str], tmp_path: Path) -> None:
    home, tag = store
    with serve(home, tag.split(":")[0], tmp_path) as server:  # the default drain: FALCON_TIMEOUT
        out = drain_check(server, 200)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "200 completion tokens of 200" in out.stdout


def test_the_drain_check_fails_a_stream_cut_at_the_drain_cap(store: tuple[Path, str], tmp_path: Path) -> None:
    """A stream that outlives FALCON_DRAIN_TIMEOUT ends with an error event, then [DONE]: the check must
    not take that [DONE] for a whole reply (it did: a 1,500-token stream outlived the 30 s cap)."""
    home, tag = store
    with serve(home, tag.split(":")[0], tmp_path, drain_timeout="1") as server:
        out = drain_check(server, 1900)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "shutting down" in out.stderr and "NOT WHOLE" in out.stderr
    assert "[DONE] seen" in out.stdout  # the stream did end properly: only its reply was cut
