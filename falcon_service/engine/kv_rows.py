"""The one owner of the KV cache's rows: which sequence (by id) holds which row, the prefixes that finished
sequences leave behind for new prompts to reuse, and which rows hold copies of one prefix (lineages).

Each running sequence owns one row of the runner's preallocated cache, and the running rows are kept
compact at the front (0..size-1), so a decode step reads the cache as views, with no copy. A sequence
that leaves has its row refilled by the last running row. A row's positions start at 0 whatever the
other rows hold, so results do not depend on the batch.

Prefix reuse (`prefix_caching`): the pool's other rows hold the tokens of finished sequences, kept
from the top of the pool down while there is room, least recently used evicted first; running
rows are never evicted. A new prompt whose start is held by any row, running or idle, gets those
positions' keys and values copied into its own row and prefills only the rest.

The host keeps each row's length; the device keeps the runner's decode buffers in step with it
(lengths, where each row writes, the token each row feeds next). The tokens a step samples stay
on the device and become the next step's input (`set_tokens`), so a decode step needs nothing
from the host but the batch's shape.

The staging row (after the pool) holds a prompt too long for one step, prefilled there a chunk at
a time in the steps' passes; its choices join the running rows once it is complete.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from .falcon import FalconRunner, Segment, SharedPrefix
from .prefix_cache import PrefixCache, PrefixMatch

MIN_SHARED = 64  # tokens a prefix must have for its rows to attend to it together



@dataclass(frozen=True)
class Placement:
    """A prompt placed for prefilling: its first row (the others of its `seq_ids` follow), its tokens, and
    where the part to compute starts (after what the prefix cache gave it)."""

    seq_ids: tuple[int, ...]
    row: int
    prompt: Seq[int]
    start: int
    salt: int
    lineage: tuple[int, int]

    @property
    def segment(self) -> Segment:
        return Segment(self.row, self.start, self.prompt[self.start:])


class KVRows:
    """The rows of a runner's KV cache, keyed by sequence id; `ids[i]` holds row i."""

    def __init__(self, runner: FalconRunner, prefix_caching: bool = False, cascade: bool = True) -> None:
        self.runner = runner
        self.io = runner.io
        self.ids: list[int] = []  # the sequence of each running row
        self._row_of: dict[int, int] = {}
        self.lengths: list[int] = []  # tokens cached per running row
        self.idle: dict[int, int] = {}  # rows past the running ones that keep a finished prefix: length
        self.prefixes = PrefixCache() if prefix_caching else None
        # which rows hold bit-identical copies of one prefix: (lineage, how many tokens), per running and
        # idle row; rows of one lineage attend to their common prefix together (cascade attention)
        self.lineages: list[tuple[int, int]] = []
        self.idle_lineages: dict[int, tuple[int, int]] = {}
        self._lineage_ids = itertools.count()
        self._staged_lineage: tuple[int, int] | None = None
        self._cascade = cascade and prefix_caching
        self._sync_buffers()

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.runner.batch_rows

    @property
    def pool_rows(self) -> int:
        return self.runner.cache.pool_rows

    @property
    def staging_row(self) -> int:
        return self.runner.cache.staging_row

    @property
    def cache_tokens(self) -> int:
        """Tokens the running sequences hold in the KV cache."""
        return sum(self.lengths)

    @property
    def idle_tokens(self) -> int:
        """Tokens kept for reuse in idle rows."""
        return sum(self.idle.values())

    def _sync_buffers(self) -> None:
        """Upload each row's length and write row after the batch's rows changed; unused slots get
        position 0 and the scratch row, so a padded decode step touches no real row."""
        free = self.capacity - self.size
        self.runner.lengths.copy_(self.io.upload(self.lengths + [0] * free, torch.long))
        rows = list(range(self.size)) + [self.runner.cache.scratch_row] * free
        self.runner.write_rows.copy_(self.io.upload(rows, torch.long))

    def set_tokens(self, first_row: int, tokens: torch.Tensor | Seq[int]) -> None:
        """Rows first_row.. feed these tokens at their next decode step (sampled tokens stay on the device)."""
        if not isinstance(tokens, torch.Tensor):
            tokens = self.io.upload(list(tokens), torch.long)
        self.runner.tokens[first_row : first_row + tokens.shape[0]] = tokens

    def _width(self) -> int:
        """Positions a decode step attends over: each row's cache plus its new token."""
        return max(self.lengths) + 1

    # ---- prefixes ----

    def lookup(self, prompt: Seq[int], salt: int = 0) -> PrefixMatch | None:
        """The longest cached start of `prompt` under `salt` (in whole blocks; never the whole prompt), if any."""
        return self.prefixes.lookup(prompt, salt) if self.prefixes is not None else None

    def _valid(self, match: PrefixMatch | None) -> PrefixMatch | None:
        """`match`, if its prefix is still held (making room may have evicted it)."""
        if match is None or self.prefixes is None or self.prefixes.get(match.prefix.row) is not match.prefix:
            return None
        return match

    def _free_row(self, avoid: range) -> int | None:
        """The highest pool row that is neither running, idle nor in `avoid`."""
        for row in range(self.pool_rows - 1, self.size - 1, -1):
            if row not in self.idle and row not in avoid:
                return row
        return None

    def _move(self, src: int, dst: int, length: int) -> None:
        self.runner.cache.copy_row(src, dst, length)
        if self.prefixes is not None:
            self.prefixes.move(src, dst)

    def _evict(self, row: int) -> None:
        self.idle.pop(row, None)
        self.idle_lineages.pop(row, None)
        if self.prefixes is not None:
            self.prefixes.drop(row)

    def _lineage_of(self, row: int) -> tuple[int, int] | None:
        if row < self.size:
            return self.lineages[row]
        return self.idle_lineages.get(row)

    def _new_lineage(self, length: int) -> tuple[int, int]:
        return next(self._lineage_ids), length

    def _inherited_lineage(self, match: PrefixMatch) -> tuple[int, int] | None:
        """The lineage of a row that copies `match`'s prefix: its source's, over the tokens both hold."""
        source = self._lineage_of(match.prefix.row)
        return (source[0], min(match.length, source[1])) if source is not None else None

    def shared_prefix(self) -> SharedPrefix | None:
        """The largest group of running rows that hold copies of one prefix of at least MIN_SHARED tokens."""
        if not self._cascade or self.size < 2:
            return None
        groups: dict[int, list[int]] = {}
        for row, (lineage, _) in enumerate(self.lineages):
            groups.setdefault(lineage, []).append(row)
        rows = max(groups.values(), key=len)
        length = min(self.lineages[row][1] for row in rows)
        if len(rows) < 2 or length < MIN_SHARED:
            return None
        return SharedPrefix(rows, rows[0], length)

    def _least_recently_used(self, exclude: range, pinned: set[int], also: int | None = None) -> int | None:
        """The idle row to evict first, outside `exclude` and `pinned` (or `also`, whatever it is)."""
        candidates = [r for r in self.idle if r not in exclude and r not in pinned]
        if also is not None:
            candidates.append(also)
        if not candidates:
            return None
        assert self.prefixes is not None
        return self.prefixes.least_recently_used(candidates)

    def _make_room(self, count: int, matches: Seq[PrefixMatch | None] = ()) -> None:
        """Free rows size..size+count-1 for new running rows: an idle row there moves to a free row
        further up, or over the least recently used idle row (evicted), or is evicted itself."""
        if self.size + count > self.capacity:
            raise RuntimeError(f"batch of {self.capacity} rows is full")
        needed = range(self.size, self.size + count)
        pinned = {m.prefix.row for m in matches if m is not None}  # copied from in this step: keep if possible
        for row in needed:
            if row not in self.idle:
                continue
            target = self._free_row(needed)
            if target is None:  # the pool is full: the least recently used idle row goes, this one or another
                victim = self._least_recently_used(needed, pinned | {row}, also=None if row in pinned else row)
                if victim is None or victim == row:
                    self._evict(row)
                    continue
                self._evict(victim)
                target = victim
            length = self.idle.pop(row)
            self._move(row, target, length)
            self.idle[target] = length
            self.idle_lineages[target] = self.idle_lineages.pop(row, self._new_lineage(0))

    def _keep(self, row: int, length: int, tokens: Seq[int], salt: int, pinned: set[int]) -> None:
        """Keep the finished running row `row` (its first `length` of `tokens`, under `salt`) in an idle row, if
        there is room or a less recently used idle row (not `pinned`) to give way. Its prefix moves along, the
        same object: a match made of it (a prompt admitted at this step) stays good."""
        assert self.prefixes is not None
        target = self._free_row(range(0))
        if target is None:
            target = self._least_recently_used(range(0), pinned)
            if target is None:
                return
            self._evict(target)
        self.runner.cache.copy_row(row, target, length)
        if self.prefixes.get(row) is not None:
            self.prefixes.move(row, target)
            self.prefixes.extend(target, tokens[:length], salt)
        else:
            self.prefixes.put(target, tokens[:length], salt)
        self.idle[target] = length
        self.idle_lineages[target] = self.lineages[row]

    # ---- rows of sequences ----

    def row(self, seq_id: int) -> int:
        return self._row_of[seq_id]

    def place(self, requests: Seq[tuple[Seq[int], Seq[int], PrefixMatch | None, int]]) -> list[Placement]:
        """Rows for new prompts, after the running rows: each `(seq_ids, prompt, match, salt)` gets one row per
        sequence; its cached start is copied into the first, which is prefilled (the others get copies in
        `join`). Returns where each prompt is prefilled."""
        matches = [match for _, _, match, _ in requests]
        self._make_room(sum(len(ids) for ids, _, _, _ in requests), matches)
        placed, row = [], self.size
        for seq_ids, prompt, match, salt in requests:
            match = self._valid(match)
            start = match.length if match is not None else 0
            lineage = None
            if match is not None:
                self.runner.cache.copy_row(match.prefix.row, row, start)
                lineage = self._inherited_lineage(match)
            lineage = lineage or self._new_lineage(len(prompt))
            placed.append(Placement(tuple(seq_ids), row, prompt, start, salt, lineage))
            row += len(seq_ids)
        return placed

    def join(self, placed: Seq[Placement]) -> None:
        """The placed prompts are prefilled: their sequences run, each prompt's row copied to its other rows."""
        for p in placed:
            for row in range(p.row, p.row + len(p.seq_ids)):
                self.runner.cache.copy_row(p.row, row, len(p.prompt))
            self._append(p.seq_ids, p.prompt, p.salt, p.lineage)
        self._sync_buffers()

    def _append(self, seq_ids: Seq[int], prompt: Seq[int], salt: int, lineage: tuple[int, int]) -> None:
        for seq_id in seq_ids:
            row = len(self.ids)
            if self.prefixes is not None:
                self.prefixes.put(row, prompt, salt)
            self.ids.append(seq_id)
            self._row_of[seq_id] = row
            self.lengths.append(len(prompt))
            self.lineages.append(lineage)

    def advance(self) -> None:
        """Every running row fed one token (a decode step)."""
        self.runner.lengths[: self.size] += 1
        self.lengths = [n + 1 for n in self.lengths]

    def decode_width(self) -> int:
        """Positions a decode step attends over: each row's cache plus its new token."""
        return self._width()

    def stage(self, chunk: Seq[int], offset: int, match: PrefixMatch | None = None) -> Segment:
        """The next chunk of a long prompt (tokens `offset`..) for the staging row; the first chunk after a
        cached start (`match`, of `offset` tokens) copies it in first."""
        match = self._valid(match)
        if match is not None:
            self.runner.cache.copy_row(match.prefix.row, self.staging_row, match.length)
            self._staged_lineage = self._inherited_lineage(match)
        elif offset == 0:
            self._staged_lineage = None
        return Segment(self.staging_row, offset, chunk)

    def adopt_staged(self, seq_ids: Seq[int], prompt: Seq[int], salt: int = 0) -> None:
        """The staged prompt is whole: its sequences run, in new rows at the end."""
        self._make_room(len(seq_ids))
        for row in range(self.size, self.size + len(seq_ids)):
            self.runner.cache.copy_row(self.staging_row, row, len(prompt))
        self._append(seq_ids, prompt, salt, self._staged_lineage or self._new_lineage(len(prompt)))
        self._staged_lineage = None
        self._sync_buffers()

    def free(self, seq_ids: Seq[int], keep: dict[int, tuple[Seq[int], int]] | None = None,
             pinned: Seq[PrefixMatch | None] = ()) -> None:
        """Free the rows of these sequences; `keep` gives, for those whose prefix is worth keeping, the tokens
        their rows hold (prompt and output) and their salt. The last running row moves into each hole. The
        prefixes of `pinned` matches (this step's admissions) are not evicted to make room."""
        rows = sorted((self._row_of.pop(i) for i in seq_ids), reverse=True)
        order = list(range(self.size))
        for row in rows:
            if self.prefixes is not None:
                seq_id = self.ids[row]
                if keep and seq_id in keep:
                    held = {m.prefix.row for m in pinned if m is not None}
                    self._keep(row, self.lengths[row], *keep[seq_id], held)
                self.prefixes.drop(row)
            last = len(order) - 1
            if row != last:
                self._move(last, row, self.lengths[last])
                order[row] = order[last]
                self.lengths[row] = self.lengths[last]
                self.lineages[row] = self.lineages[last]
                self.ids[row] = self.ids[last]
                self._row_of[self.ids[row]] = row
            order.pop()
            self.lengths.pop()
            self.lineages.pop()
            self.ids.pop()
        if order != list(range(len(order))):
            moved = self.runner.tokens.index_select(0, self.io.upload(order, torch.long))
            self.runner.tokens[: len(order)] = moved
        self._sync_buffers()
