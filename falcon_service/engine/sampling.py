"""Logits processing and sampling, per request, vectorised over the running batch."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the most likely alternatives (ids)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class SamplingState:
    """Per-sequence sampling state: its own generator and the token counts penalties need."""

    def __init__(self, params: SamplingParams, prompt_ids: Seq[int], vocab_size: int, seed: int | None) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)
        self.output_counts: torch.Tensor | None = None
        self.prompt_mask: torch.Tensor | None = None
        if params.needs_penalties:
            self.output_counts = torch.zeros(vocab_size, dtype=torch.float32)
            self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool)
            self.prompt_mask[torch.tensor(list(prompt_ids), dtype=torch.long)] = True
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
            self.bias = (ids, torch.tensor(list(params.logit_bias.values()), dtype=torch.float32))

    def record(self, token_id: int) -> None:
        if self.output_counts is not None:
            self.output_counts[token_id] += 1


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


def sample(
    logits: torch.Tensor, states: Seq[SamplingState], fallback: torch.Generator
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Pick one token per row of `logits` (batch, vocab) with each row's own parameters."""
    logits = logits.float()
    raw = logits
    if any(s.output_counts is not None or s.bias is not None for s in states):
        logits = logits.clone()
        for row, s in enumerate(states):
            if s.output_counts is not None:
                logits[row] = apply_penalties(logits[row], s)
            if s.bias is not None:
                logits[row, s.bias[0]] += s.bias[1]
    params = [s.params for s in states]
    greedy = torch.tensor([p.greedy for p in params])
    chosen = logits.argmax(-1)
    if not bool(greedy.all()):
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], dtype=logits.dtype)
        scaled = logits / temps.unsqueeze(-1)
        top_k = torch.tensor([p.top_k for p in params])
        top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype)
        if bool((top_k > 0).any() or (top_p < 1.0).any()):
            scaled = _top_k_top_p(scaled, top_k, top_p)
        probs = scaled.softmax(-1)
        uniform = torch.cat([torch.rand(1, generator=s.generator or fallback) for s in states])
        cdf = probs.cumsum(-1)
        sampled = (cdf < (uniform * cdf[:, -1]).unsqueeze(-1)).sum(-1).clamp(max=probs.shape[-1] - 1)
        # never land on a token the filters removed (possible only through rounding at the edges)
        sampled = torch.where(probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1) > 0, sampled, chosen)
        chosen = torch.where(greedy, chosen, sampled)
    tokens = chosen.tolist()
    logprobs: list[TokenLogprob | None] = [None] * len(states)
    wanted = [row for row, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        lp = raw[wanted].log_softmax(-1)
        k = max(params[row].logprobs or 0 for row in wanted)
        top_vals, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        for i, row in enumerate(wanted):
            n = params[row].logprobs or 0
            top = list(zip(top_ids[i, :n].tolist(), top_vals[i, :n].tolist(), strict=True))
            logprobs[row] = TokenLogprob(tokens[row], float(lp[i, tokens[row]]), top)
    for s, t in zip(states, tokens, strict=True):
        s.record(t)
    return tokens, logprobs
