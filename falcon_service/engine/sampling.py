"""Logits processing and sampling, per request, vectorised over the running batch, on the logits' device.

Every tensor lives where the logits are. Each request draws its random numbers on the host from
its own generator (one uniform per step), and a step's draws travel to the device in one upload:
a seeded request gives the same tokens whatever else is in the batch, and on any device that
computes the same logits. The sampled tokens stay on the device (they are the next step's input);
`SampledTokens.download()` brings them and any logprobs to the host without blocking the device.
"""

from __future__ import annotations

import random
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from .device import DeviceIO, Download
from .grammar import Grammar, GrammarMatcher, allowed_tokens, fill_masks


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; validated by the API layer before it gets here."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    ignore_eos: bool = False
    grammar: Grammar | None = field(default=None, compare=False, hash=False)  # constrained decoding

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the most likely alternatives (ids)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class SamplingState:
    """Per-sequence sampling state: its own random generator and, on the device, what penalties and
    logit bias need (generated-token counts, the prompt's tokens, the bias)."""

    def __init__(self, params: SamplingParams, prompt_ids: Seq[int], vocab_size: int, seed: int | None,
                 device: torch.device | str = "cpu", io: DeviceIO | None = None) -> None:
        self.params = params
        self.rng = random.Random(seed)  # seed None: from the OS's entropy
        io = io or DeviceIO(device)
        self.output_counts: torch.Tensor | None = None
        self.prompt_mask: torch.Tensor | None = None
        if params.needs_penalties:
            self.output_counts = torch.zeros(vocab_size, dtype=torch.float32, device=io.device)
            self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=io.device)
            self.prompt_mask.index_fill_(0, io.upload(list(prompt_ids), torch.long), True)
        self.matcher: GrammarMatcher | None = params.grammar.matcher() if params.grammar is not None else None
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            self.bias = (io.upload(list(params.logit_bias), torch.long),
                         io.upload(list(params.logit_bias.values()), torch.float32))

    def record(self, token: torch.Tensor | int) -> None:
        """Count a generated token (a one-element device tensor, so that no value is read on the host)."""
        if self.output_counts is None:
            return
        if isinstance(token, int):
            self.output_counts[token] += 1
        else:
            self.output_counts.index_add_(0, token.reshape(1), torch.ones_like(token.reshape(1), dtype=torch.float32))


def apply_penalties(logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
    """OpenAI presence/frequency penalties on generated tokens; HF repetition penalty on all seen tokens."""
    p = state.params
    counts = state.output_counts
    assert counts is not None and state.prompt_mask is not None
    if p.repetition_penalty != 1.0:
        seen = state.prompt_mask | (counts > 0)
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if p.frequency_penalty:
        logits = logits - p.frequency_penalty * counts
    if p.presence_penalty:
        logits = logits - p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what falls outside each row's top-k and nucleus; top_k 0 means off."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(-1)
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # a token is dropped when the tokens ranked above it already reach top_p
    before = probs.cumsum(-1) - probs
    drop |= before >= top_p.unsqueeze(-1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


@dataclass
class SampledTokens:
    """One step's choices, on the device: `tokens` (B,), and the logprobs of the rows that asked."""

    tokens: torch.Tensor
    logprob_rows: list[int]  # rows that asked for logprobs, in order
    top_counts: list[int]  # how many alternatives each of them asked for
    chosen_logprobs: torch.Tensor | None = None  # (len(logprob_rows),)
    top_ids: torch.Tensor | None = None  # (len(logprob_rows), max top count)
    top_values: torch.Tensor | None = None

    def download(self, io: DeviceIO) -> SampledOnHost:
        """Start the copy to the host: the step's one read of device values."""
        tensors = [self.tokens]
        if self.logprob_rows:
            assert self.chosen_logprobs is not None and self.top_ids is not None and self.top_values is not None
            tensors += [self.chosen_logprobs, self.top_ids, self.top_values]
        return SampledOnHost(io.download(tensors), self.logprob_rows, self.top_counts)


class SampledOnHost:
    """`SampledTokens` on their way to the host; `result()` waits for them."""

    def __init__(self, download: Download, logprob_rows: list[int], top_counts: list[int]) -> None:
        self._download = download
        self._rows = logprob_rows
        self._counts = top_counts

    def result(self) -> tuple[list[int], list[TokenLogprob | None]]:
        host = self._download.wait()
        tokens: list[int] = host[0].tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(tokens)
        if self._rows:
            chosen, ids, values = host[1].tolist(), host[2].tolist(), host[3].tolist()
            for i, (row, n) in enumerate(zip(self._rows, self._counts, strict=True)):
                top = list(zip(ids[i][:n], values[i][:n], strict=True))
                logprobs[row] = TokenLogprob(tokens[row], chosen[i], top)
        return tokens, logprobs


def sample(logits: torch.Tensor, states: Seq[SamplingState], io: DeviceIO | None = None) -> SampledTokens:
    """Pick one token per row of `logits` (batch, vocab) with each row's own parameters, on the device.

    What is decided per step on the host comes from the parameters (never from device values), so
    nothing here waits for the device.
    """
    io = io or DeviceIO(logits.device)
    logits = logits.float()
    raw = logits
    constrained = [row for row, s in enumerate(states) if s.matcher is not None]
    if constrained or any(s.output_counts is not None or s.bias is not None for s in states):
        logits = logits.clone()
        for row, s in enumerate(states):
            if s.output_counts is not None:
                logits[row] = apply_penalties(logits[row], s)
            if s.bias is not None:
                logits[row].index_add_(0, s.bias[0], s.bias[1])
    if constrained:  # only the rows with a grammar: their masks are filled on the host, sent in one upload
        vocab = logits.shape[-1]
        bitmask = torch.zeros(len(constrained), (vocab + 31) // 32, dtype=torch.int32)
        fill_masks([states[row].matcher for row in constrained], bitmask)  # type: ignore[misc]
        allowed = allowed_tokens(io.upload(bitmask, torch.int32), vocab)
        index = io.upload(constrained, torch.long)
        logits.index_copy_(0, index, logits.index_select(0, index).masked_fill(~allowed, float("-inf")))
    params = [s.params for s in states]
    chosen = logits.argmax(-1)
    if not all(p.greedy for p in params):
        # one upload per step: temperature, top-p, top-k, the row's uniform draw, greedy flag
        rows = [(p.temperature if not p.greedy else 1.0, p.top_p, float(p.top_k),
                 s.rng.random() if not p.greedy else 0.0, float(p.greedy)) for s, p in zip(states, params, strict=True)]
        knobs = io.upload(rows, torch.float32)
        temps, top_p, top_k, uniform, greedy = knobs.unbind(-1)
        scaled = logits / temps.unsqueeze(-1)
        if any(p.filters for p in params if not p.greedy):
            scaled = _top_k_top_p(scaled, top_k.long(), top_p)
        probs = scaled.softmax(-1)
        cdf = probs.cumsum(-1)
        sampled = (cdf < (uniform * cdf[:, -1]).unsqueeze(-1)).sum(-1).clamp(max=probs.shape[-1] - 1)
        # never land on a token the filters removed (possible only through rounding at the edges)
        sampled = torch.where(probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1) > 0, sampled, chosen)
        chosen = torch.where(greedy.bool(), chosen, sampled)
    result = SampledTokens(chosen, [], [])
    wanted = [row for row, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        if len(wanted) == len(params):
            picked, picked_tokens = raw, chosen
        else:
            index = io.upload(wanted, torch.long)
            picked, picked_tokens = raw.index_select(0, index), chosen.index_select(0, index)
        lp = picked.log_softmax(-1)
        counts = [params[row].logprobs or 0 for row in wanted]
        k = max(counts)
        top_values, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        result = SampledTokens(chosen, wanted, counts, lp.gather(-1, picked_tokens.unsqueeze(-1)).squeeze(-1),
                               top_ids, top_values)
    for row, s in enumerate(states):
        if s.output_counts is not None:
            s.record(chosen[row : row + 1])
    return result
