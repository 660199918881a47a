"""The README's examples, as pasted, against a real `bentoml serve` of the tiny model (only the port is the
test server's): the curl call, the `openai` client's, BentoML's client's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"


def examples() -> list[tuple[str, str]]:
    """(language, code) of each fenced block of the README's "Calling it" section."""
    text = README.read_text()
    section = text[text.index("## Calling it"):text.index("### What requests can ask for")]
    return re.findall(r"```(bash|python)\n(.*?)```", section, re.S)


def run(language: str, code: str, url: str) -> str:
    code = code.replace("localhost:3000", url.removeprefix("http://"))
    command = ["bash", "-c", code] if language == "bash" else [sys.executable, "-c", code]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{language} example failed:\n{code}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_readme_has_the_examples_it_had():
    assert [language for language, _ in examples()] == ["bash", "python", "python"]


def test_the_curl_example_streams_a_chat_completion(server):
    (code,) = [c for lang, c in examples() if lang == "bash"]
    out = run("bash", code, server.url)
    assert '"object":"chat.completion.chunk"' in out and out.rstrip().endswith("data: [DONE]")
    assert '"usage":{"prompt_tokens"' in out


def test_the_openai_client_example(server):
    code = next(c for lang, c in examples() if lang == "python")
    out = run("python", code, server.url)
    assert "CompletionUsage(" in out and '{"name":"' in out


def test_the_bentoml_client_example(server):
    code = [c for lang, c in examples() if lang == "python"][1]
    out = run("python", code, server.url)
    assert "'finish_reason':" in out
