"""One choice of one request, as the engine thread tracks it: tokens, text, stops, sampling state."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from .detokenizer import IncrementalDetokenizer, StopMatcher
from .device import DeviceIO
from .request import ChoiceEvent, FinishReason
from .sampling import SamplingState, TokenLogprob
from .stream import RequestStream


class SequenceState:
    """A choice being generated. `scheduled` counts the tokens whose sampling has been launched,
    which runs ahead of `output_ids` (the tokens read back) when host work overlaps device work."""

    def __init__(self, stream: RequestStream, index: int, tokenizer: PreTrainedTokenizerBase, vocab: int,
                 io: DeviceIO, max_len: int, seq_id: int = 0) -> None:
        request = stream.request
        self.seq_id = seq_id
        self.stream = stream
        self.index = index
        self.params = request.params
        self.prompt_len = len(request.prompt_ids)
        # the most tokens this choice can make: max_tokens, and what the context leaves
        self.budget = min(self.params.max_tokens, max_len - self.prompt_len)
        self.output_ids: list[int] = []
        self.scheduled = 0
        self.detokenizer = IncrementalDetokenizer(tokenizer, list(request.prompt_ids))
        self.stops = StopMatcher(list(self.params.stop))
        seed = None if self.params.seed is None else (self.params.seed * 1_000_003 + index) % 2**63
        self.sampling = SamplingState(self.params, request.prompt_ids, vocab, seed, io=io)
        self.finish_reason: FinishReason | None = None

    @property
    def tokens(self) -> list[int]:
        """Prompt and output so far (what its KV cache row holds, and the token sampled last)."""
        return [*self.stream.request.prompt_ids, *self.output_ids]

    @property
    def done(self) -> bool:
        """Finished, or every token it may make is already on its way (nothing more to schedule)."""
        return self.finish_reason is not None or self.scheduled >= self.budget

    def accept(self, token: int, logprob: TokenLogprob | None, eos: int | None) -> ChoiceEvent:
        """Take the sampled token; return what the client sees, with the finish reason if it ends here
        (`ERROR` for a token its grammar rejects: no text, the engine fails the request)."""
        self.output_ids.append(token)
        is_eos = token == eos and not self.params.ignore_eos
        matcher = self.sampling.matcher
        complete = False  # a grammar that is satisfied: the reply ends here, it needs no end token
        if matcher is not None and not is_eos:
            if not matcher.accept(token):
                # the sampler masks every token the grammar refuses: this is an engine fault, never an end
                self.finish_reason = FinishReason.ERROR
                return ChoiceEvent(self.index, "", [token], [], FinishReason.ERROR)
            complete = matcher.done
        text, hit = self.stops.feed("" if is_eos else self.detokenizer.add(token))
        if hit:
            self.finish_reason = FinishReason.STOP
        elif is_eos or complete or len(self.output_ids) >= self.budget:
            tail, hit = self.stops.feed(self.detokenizer.flush())
            text += tail if hit else tail + self.stops.flush()
            self.finish_reason = FinishReason.STOP if is_eos or complete or hit else FinishReason.LENGTH
        return ChoiceEvent(self.index, text, [token], [logprob] if logprob else [], self.finish_reason)
