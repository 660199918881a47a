"""IncrementalDetokenizer and StopMatcher on the tiny checkpoint's byte-level BPE tokenizer."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest

from falcon_service.checkpoints import EOS_TOKEN
from falcon_service.engine.detokenizer import (
    MAX_PENDING_TOKENS,
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    StopMatcher,
)

TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "日本語",
    "🦅🚀",
    "naïve café",
    "The falcon 🦅 flies over 日本 and a naïve café — “quoted” 👍🏽!",
    "def add(a, b):\n    return a + b\n",
    "Ελληνικά, русский текст, 한국어 텍스트, 中文文本。",
    "emoji run ✨✨✨🚀🚀🦅",
    "\n\nUser: what do falcons eat?\nAssistant: mice",
    "ascii 0123456789 +-*/=<>()[]{}!?.,;:'\"",
]


def stream(detok: IncrementalDetokenizer, ids: Sequence[int]) -> list[str]:
    return [detok.add(i) for i in ids]


class DecodeRecorder:
    """Wraps a tokenizer and records how many ids each decode call was given."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.all_special_ids = tokenizer.all_special_ids
        self.sizes: list[int] = []

    def decode(self, ids: Sequence[int], **kwargs: Any) -> str:
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


@pytest.mark.parametrize(("text", "chars"), [("日本語", "日本語"), ("🦅🚀", "🦅🚀"), ("naïve café", "ïé")])
def test_character_split_across_tokens_is_emitted_whole_when_complete(tiny_tokenizer, text, chars):
    ids = tiny_tokenizer.encode(text)
    # The premise: this tokenizer splits these characters over several byte tokens.
    split = [i for i in ids if REPLACEMENT_CHAR in tiny_tokenizer.decode([i])]
    assert len(split) >= 2 * len(chars)

    detok = IncrementalDetokenizer(tiny_tokenizer)
    outputs = stream(detok, ids)
    assert not any(REPLACEMENT_CHAR in out for out in outputs)
    assert "".join(outputs) == text
    assert detok.flush() == ""
    # Each multi-byte character comes out whole at the very token that completes it.
    for char in chars:
        (index,) = [k for k, out in enumerate(outputs) if char in out]
        assert char in tiny_tokenizer.decode(ids[: index + 1])
        assert char not in tiny_tokenizer.decode(ids[:index])


def test_cjk_characters_come_out_one_per_completing_token(tiny_tokenizer):
    ids = tiny_tokenizer.encode("日本語")
    assert len(ids) == 9  # three byte tokens per character
    outputs = stream(IncrementalDetokenizer(tiny_tokenizer), ids)
    assert outputs == ["", "", "日", "", "", "本", "", "", "語"]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    detok = IncrementalDetokenizer(tiny_tokenizer)
    outputs = stream(detok, ids)
    full = tiny_tokenizer.decode(ids, skip_special_tokens=True)
    assert full == text
    assert "".join(outputs) + detok.flush() == full
    assert not any(REPLACEMENT_CHAR in out for out in outputs)
    # Nothing is held back at the end of well-formed text.
    assert "".join(outputs) == full


@pytest.mark.parametrize("text", TEXTS)
def test_prompt_context_does_not_leak_into_output(tiny_tokenizer, text):
    prompt_ids = tiny_tokenizer.encode("User: tell me about 日本 🦅\nAssistant:")
    ids = tiny_tokenizer.encode(text)
    detok = IncrementalDetokenizer(tiny_tokenizer, prompt_ids)
    assert "".join(stream(detok, ids)) + detok.flush() == text


def test_random_token_sequences_without_bad_bytes_match_full_decode(tiny_tokenizer):
    rng = random.Random(1)
    vocab = len(tiny_tokenizer)
    checked = 0
    while checked < 50:
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        full = tiny_tokenizer.decode(ids, skip_special_tokens=True)
        if REPLACEMENT_CHAR in full:
            continue
        detok = IncrementalDetokenizer(tiny_tokenizer)
        outputs = stream(detok, ids)
        assert not any(REPLACEMENT_CHAR in out for out in outputs)
        assert "".join(outputs) + detok.flush() == full
        checked += 1


def test_special_tokens_are_skipped(tiny_tokenizer):
    eos = tiny_tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    ids = tiny_tokenizer.encode("Hi 日")
    ids = [*ids[:2], eos, *ids[2:], eos]
    detok = IncrementalDetokenizer(tiny_tokenizer)
    outputs = stream(detok, ids)
    assert outputs[2] == "" and outputs[-1] == ""
    assert "".join(outputs) + detok.flush() == "Hi 日" == tiny_tokenizer.decode(ids, skip_special_tokens=True)


def test_decodes_a_small_window_not_the_whole_output(tiny_tokenizer):
    text = " ".join(TEXTS) * 3
    ids = tiny_tokenizer.encode(text)
    assert len(ids) > 500
    recorder = DecodeRecorder(tiny_tokenizer)
    detok = IncrementalDetokenizer(recorder, tiny_tokenizer.encode("prompt"))
    assert "".join(stream(detok, ids)) + detok.flush() == text
    # A window spans the last emitted chunk plus the tokens of one (possibly multi-byte) character.
    assert max(recorder.sizes) <= 8


def test_undecodable_byte_is_released_by_the_next_character(tiny_tokenizer):
    lead = tiny_tokenizer.convert_tokens_to_ids("æ")  # 0xE6: starts a 3-byte character
    letter = tiny_tokenizer.convert_tokens_to_ids("A")
    assert tiny_tokenizer.decode([lead]) == REPLACEMENT_CHAR

    detok = IncrementalDetokenizer(tiny_tokenizer)
    assert detok.add(lead) == ""
    assert detok.add(letter) == REPLACEMENT_CHAR + "A"

    detok = IncrementalDetokenizer(tiny_tokenizer)
    assert detok.add(lead) == ""
    assert detok.add(lead) == REPLACEMENT_CHAR  # the first can no longer complete
    assert detok.flush() == REPLACEMENT_CHAR  # the second is released at the end
    assert detok.flush() == ""


def test_random_ids_never_hold_back_more_than_one_character(tiny_tokenizer):
    rng = random.Random(0)
    ids = [rng.randrange(len(tiny_tokenizer)) for _ in range(400)]
    assert REPLACEMENT_CHAR in tiny_tokenizer.decode(ids)  # the premise: some bytes never decode
    detok = IncrementalDetokenizer(tiny_tokenizer)
    emitted = ""
    for n, token_id in enumerate(ids, start=1):
        emitted += detok.add(token_id)
        so_far = tiny_tokenizer.decode(ids[:n], skip_special_tokens=True)
        held = so_far[len(emitted) :]
        assert so_far.startswith(emitted)
        assert held in ("", REPLACEMENT_CHAR)
    assert emitted + detok.flush() == tiny_tokenizer.decode(ids, skip_special_tokens=True)


def test_endless_incomplete_bytes_keep_the_window_bounded(tiny_tokenizer):
    lead = tiny_tokenizer.convert_tokens_to_ids("æ")
    recorder = DecodeRecorder(tiny_tokenizer)
    detok = IncrementalDetokenizer(recorder)
    outputs = stream(detok, [lead] * 200)
    assert set("".join(outputs)) == {REPLACEMENT_CHAR}
    # At most one replacement character is held back at any time.
    assert all(len("".join(outputs[:n])) >= n - 1 for n in range(1, 201))
    assert "".join(outputs) + detok.flush() == REPLACEMENT_CHAR * 200
    assert max(recorder.sizes) <= MAX_PENDING_TOKENS + 2


def test_stop_string_spanning_chunks_is_trimmed():
    matcher = StopMatcher(["\nUser:"])
    assert matcher.feed("Hel") == ("Hel", False)
    assert matcher.feed("lo\nUs") == ("lo", False)
    assert matcher.feed("er: x") == ("", True)
    assert matcher.feed("more text") == ("", True)
    assert matcher.flush() == ""


def test_partial_stop_that_does_not_complete_is_released():
    matcher = StopMatcher(["\nUser:"])
    assert matcher.feed("a\nUs") == ("a", False)
    assert matcher.feed("ual") == ("\nUsual", False)
    assert matcher.flush() == ""


def test_holds_back_only_the_longest_suffix_that_starts_a_stop():
    matcher = StopMatcher(["\nUser:"])
    assert matcher.feed("x\n\nU") == ("x\n", False)
    assert matcher.feed("ser: y") == ("", True)


def test_stop_inside_one_chunk_cuts_there():
    matcher = StopMatcher(["\nUser:"])
    assert matcher.feed("Falcons eat mice.\nUser: and bats?") == ("Falcons eat mice.", True)


@pytest.mark.parametrize("stops", [["User:", "\n\n"], ["\n\n", "User:"]])
def test_earliest_stop_wins_whatever_the_list_order(stops):
    assert StopMatcher(stops).feed("Hi\n\nUser: x") == ("Hi", True)
    assert StopMatcher(stops).feed("Hi User:\n\n") == ("Hi ", True)


def test_earliest_of_overlapping_stops_across_chunks():
    matcher = StopMatcher(["bcd", "abc"])
    assert matcher.feed("xab") == ("x", False)
    assert matcher.feed("cd") == ("", True)


def test_flush_releases_held_text_when_no_stop_was_hit():
    matcher = StopMatcher(["\nUser:"])
    assert matcher.feed("ab\nUse") == ("ab", False)
    assert matcher.flush() == "\nUse"
    assert matcher.flush() == ""


def test_no_stop_strings_pass_everything_through():
    matcher = StopMatcher([])
    assert matcher.feed("a\nUs") == ("a\nUs", False)
    assert matcher.feed("er: b") == ("er: b", False)
    assert matcher.flush() == ""


def test_detokenizer_and_stop_matcher_together(tiny_tokenizer):
    ids = tiny_tokenizer.encode("Falcons 🦅 eat mice.\nUser: what else?")
    detok, matcher = IncrementalDetokenizer(tiny_tokenizer), StopMatcher(["\nUser:"])
    emitted, stopped_at = [], None
    for n, token_id in enumerate(ids):
        text, stopped = matcher.feed(detok.add(token_id))
        emitted.append(text)
        if stopped:
            stopped_at = n
            break
    assert "".join(emitted) == "Falcons 🦅 eat mice."
    assert stopped_at is not None and stopped_at < len(ids) - 1


def test_the_fast_tokenizers_own_decoder_gives_transformers_text(tiny_tokenizer):
    """The detokenizer calls a fast tokenizer's Rust decoder directly (transformers' `decode` costs ~12 us more a
    call): the same deltas as through transformers' `decode`, for text and for random ids (broken bytes too)."""
    rng = random.Random(5)
    cases = [tiny_tokenizer.encode(t) for t in TEXTS]
    cases += [[rng.randrange(tiny_tokenizer.vocab_size) for _ in range(200)] for _ in range(20)]
    for ids in cases:
        direct = IncrementalDetokenizer(tiny_tokenizer, [5, 6, 7])
        assert direct._backend_decode is not None, "the tiny tokenizer is a fast one: the direct path is taken"
        through = IncrementalDetokenizer(DecodeRecorder(tiny_tokenizer), [5, 6, 7])
        assert through._backend_decode is None
        assert [*stream(direct, ids), direct.flush()] == [*stream(through, ids), through.flush()]
