"""Which token prefixes the KV cache's rows hold, so that a new prompt can reuse the longest one.

Every row of the pool that holds tokens (a running sequence's prompt, or a finished sequence kept
while the pool has room) is indexed by its blocks of `BLOCK` tokens: block i's key is a hash of
block i-1's key and block i's tokens, so one key stands for the whole prefix up to its block. A
lookup walks the prompt's keys until one is missing: its cost grows with the prompt's length, not
with the number of rows. The tokens of the row found are compared before it is trusted (a hash
collision costs a miss, never a wrong answer). Idle rows are evicted least recently used first.

A salt (vLLM's `cache_salt`, or the API key when several are configured) starts a prefix's chain of keys:
prompts of different salts never share a row, so one caller cannot learn from `cached_tokens` (or timing)
what another one's prompts held.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

BLOCK = 16


@dataclass
class Prefix:
    """The tokens one row holds, and the keys of its complete blocks."""

    row: int
    tokens: list[int]
    keys: list[int] = field(default_factory=list)
    last_used: int = 0
    salt: int = 0


@dataclass(frozen=True)
class PrefixMatch:
    """The first `length` tokens of a prompt are cached in `prefix` (whose row may move: read it late)."""

    prefix: Prefix
    length: int


def salt_key(salt: str | None) -> int:
    """The start of a salted prefix's chain of keys (0: no salt)."""
    return 0 if salt is None else hash(("cache_salt", salt)) or 1


def block_keys(tokens: Seq[int], start: int = 0, previous: int = 0) -> list[int]:
    """Keys of the complete blocks of `tokens` from block `start` on, `previous` being block start-1's key."""
    keys = []
    for begin in range(start * BLOCK, len(tokens) - BLOCK + 1, BLOCK):
        previous = hash((previous, *tokens[begin : begin + BLOCK]))
        keys.append(previous)
    return keys


class PrefixCache:
    """The index of the rows' prefixes: lookup, and bookkeeping as rows are filled, moved and freed."""

    def __init__(self) -> None:
        self._by_row: dict[int, Prefix] = {}
        self._index: dict[int, set[int]] = {}  # block key -> rows whose prefix holds that block
        self._clock = itertools.count(1)

    def __len__(self) -> int:
        return len(self._by_row)

    @property
    def indexed_blocks(self) -> int:
        return sum(len(rows) for rows in self._index.values())

    def get(self, row: int) -> Prefix | None:
        return self._by_row.get(row)

    def lookup(self, prompt: Seq[int], salt: int = 0) -> PrefixMatch | None:
        """The longest cached prefix of `prompt` (of the same `salt`) in whole blocks, leaving at least its last
        token to compute (its logits are what the request needs)."""
        found: Prefix | None = None
        blocks = 0
        for i, key in enumerate(block_keys(prompt[: len(prompt) - 1], previous=salt)):
            rows = self._index.get(key)
            if not rows:
                break
            # a row that holds block i holds blocks 0..i too: the key chains them
            found, blocks = self._by_row[next(iter(rows))], i + 1
        length = blocks * BLOCK
        if found is None or found.salt != salt or found.tokens[:length] != list(prompt[:length]):
            return None  # nothing cached, or a hash collision: a miss, never a wrong answer
        found.last_used = next(self._clock)
        return PrefixMatch(found, length)

    def put(self, row: int, tokens: Seq[int], salt: int = 0) -> Prefix:
        """Row `row` now holds `tokens` (a running sequence's prompt, or a finished one's prompt and output
        kept for reuse) under `salt`; whatever it held before is forgotten. It counts as just used."""
        self.drop(row)
        prefix = Prefix(row, list(tokens), block_keys(tokens, previous=salt), next(self._clock), salt)
        self._by_row[row] = prefix
        for key in prefix.keys:
            self._index.setdefault(key, set()).add(row)
        return prefix

    def extend(self, row: int, tokens: Seq[int], salt: int = 0) -> None:
        """Row `row`'s prefix now holds `tokens` (its tokens and more: a finished sequence's output after its
        prompt), indexed under `salt`; the same `Prefix`, so that matches made of it stay good."""
        prefix = self._by_row[row]
        self._unindex(prefix)
        prefix.tokens, prefix.salt = list(tokens), salt
        prefix.keys = block_keys(tokens, previous=salt)
        prefix.last_used = next(self._clock)
        for key in prefix.keys:
            self._index.setdefault(key, set()).add(row)

    def drop(self, row: int) -> None:
        """Row `row` holds nothing reusable any more."""
        prefix = self._by_row.pop(row, None)
        if prefix is not None:
            self._unindex(prefix)

    def _unindex(self, prefix: Prefix) -> None:
        for key in prefix.keys:
            rows = self._index.get(key)
            if rows is not None:
                rows.discard(prefix.row)
                if not rows:
                    del self._index[key]

    def move(self, src: int, dst: int) -> None:
        """The content of row `src` was copied to row `dst`; `src` is free."""
        self.drop(dst)
        prefix = self._by_row.pop(src, None)
        if prefix is None:
            return
        for key in prefix.keys:
            rows = self._index[key]
            rows.discard(src)
            rows.add(dst)
        prefix.row = dst
        self._by_row[dst] = prefix

    def least_recently_used(self, rows: Seq[int]) -> int:
        """Of these idle rows, the one to evict first."""
        return min(rows, key=lambda r: self._by_row[r].last_used if r in self._by_row else -1)
