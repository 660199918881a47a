"""OpenAI chat and completions on top of the engine, with no HTTP in it.

Turns validated protocol objects into `GenerationRequest`s, and engine events into
OpenAI responses or SSE chunk lines. Routes (HTTP) and the BentoML service both use it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from pydantic import BaseModel

from ..engine import (
    ChoiceEvent,
    EngineClient,
    FinishReason,
    GenerationRequest,
    Grammar,
    RequestStream,
    SamplingParams,
    TokenLogprob,
    UnsupportedGrammar,
)
from . import chat
from .errors import APIError, bad_request, load_failed, model_not_found, not_ready, to_api_error
from .protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatReply,
    ChatRequest,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    FunctionCall,
    FunctionCallDelta,
    GenerateRequest,
    ModelCard,
    ModelList,
    OpenAIRequest,
    PromptTokensDetails,
    ResponseMessage,
    SamplingFields,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
    new_id,
    now,
    unsupported_field,
)
from .structured import Constraint, constraint
from .tool_calls import Piece, ToolCallParser, ToolMode, tools_prompt

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


# Characters that JSON leaves raw but that many line readers take for line ends (Python's `str.splitlines`, and
# so httpx's `aiter_lines`): in an SSE line they would cut the event in two. JSON's \\u escapes mean the same.
_LINE_BREAKERS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_LINE_BREAKING = str.maketrans(_LINE_BREAKERS)


def one_line(json_text: str) -> str:
    """`json_text` with the characters that break lines for some readers escaped (the same JSON value)."""
    if any(c in json_text for c in _LINE_BREAKERS):
        return json_text.translate(_LINE_BREAKING)
    return json_text


def sse(payload: BaseModel, exclude: set[str] | None = None) -> str:
    """One server-sent event line carrying a JSON payload."""
    return f"data: {one_line(payload.model_dump_json(exclude=exclude))}\n\n"


def chunk_exclude(include_usage: bool) -> set[str]:
    """Fields a stream chunk leaves out: `usage` unless the client asked for it (then it is null until the end)."""
    return {"system_fingerprint"} if include_usage else {"usage", "system_fingerprint"}


class TextChunks:
    """The SSE line of a plain text delta, written without building models: one per token per stream.

    Byte for byte what `sse(ChatCompletionChunk(...), chunk_exclude(...))` (chat) or
    `sse(CompletionResponse(...), ...)` (completions) give for a delta with text only.
    """

    def __init__(self, chat: bool, rid: str, created: int, model: str, include_usage: bool) -> None:
        kind = "chat.completion.chunk" if chat else "text_completion"
        self._head = (f'data: {{"id":{_json(rid)},"object":"{kind}","created":{created},"model":{_json(model)},'
                      '"choices":[{"index":')
        self._field = ',"delta":{"content":' if chat else ',"text":'
        close = '},"logprobs":null,"finish_reason":null}]' if chat else ',"logprobs":null,"finish_reason":null}]'
        self._tail = close + (',"usage":null}\n\n' if include_usage else '}\n\n')

    def __call__(self, index: int, text: str) -> str:
        return f"{self._head}{index}{self._field}{_json(text)}{self._tail}"


def cache_salt(body: OpenAIRequest, tenant: str | None) -> str | None:
    """What a request's prompt shares cached prefixes under: its `cache_salt`, within its tenant (the API key it
    came with, when there are several)."""
    if tenant is None:
        return body.cache_salt
    return f"{tenant}:{body.cache_salt or ''}"


def _json(value: str) -> str:
    return one_line(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


@dataclass
class _Prepared:
    """A request ready for the engine: one `GenerationRequest` per prompt."""

    requests: list[GenerationRequest]
    prompt_texts: list[str]
    tool: ToolMode | None = None  # the replies are tool calls


class OpenAIServing:
    """The OpenAI API's logic; `attach` the engine once the model is loaded."""

    def __init__(self, model_name: str, default_chat_stop: bool = True, created: int | None = None) -> None:
        self.model_name = model_name
        self.default_chat_stop = default_chat_stop
        self.created = created or now()
        self.engine: EngineClient | None = None
        self.load_failure: str | None = None

    def attach(self, engine: EngineClient) -> None:
        self.engine = engine

    def fail(self, error: BaseException) -> None:
        """Loading the model failed: every request (and /health) says so from now on."""
        self.load_failure = f"{type(error).__name__}: {error}"

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def unavailable(self) -> APIError:
        """Why there is no engine: still loading, or loading failed."""
        return load_failed(self.load_failure) if self.load_failure else not_ready()

    def _engine(self) -> EngineClient:
        if self.engine is None:
            raise self.unavailable()
        return self.engine

    def models(self) -> ModelList:
        max_len = self.engine.max_model_len if self.engine else None
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created, max_model_len=max_len)])

    # ---------- request -> engine ----------

    def _check_common(self, body: OpenAIRequest) -> EngineClient:
        if body.model != self.model_name:
            raise model_not_found(body.model)
        if (unsupported := unsupported_field(body)) is not None:
            field, message = unsupported
            raise bad_request(f"`{field}`: {message}.", param=field, code="unsupported_parameter")
        return self._engine()

    async def _grammar(self, engine: EngineClient, found: Constraint | None) -> Grammar | None:
        """The compiled grammar of a request's constraint (compiled off the event loop and the engine's
        thread, cached); a 400 naming what the grammar engine cannot do."""
        if found is None:
            return None
        try:
            return await engine.compile_grammar(found.spec)
        except UnsupportedGrammar as exc:
            raise bad_request(f"`{found.param}` cannot be used: {exc}", param=found.param,
                              code="unsupported_grammar") from None

    def _params(self, body: SamplingFields, prompt_len: int, max_new: int | None, stop: list[str],
                logprobs: int | None, max_param: str, grammar: Grammar | None = None) -> SamplingParams:
        engine = self._engine()
        room = engine.max_model_len - prompt_len
        if room <= 0 or (max_new is not None and max_new > room):
            asked = f" plus {max_new} new tokens" if max_new is not None else ""
            raise bad_request(
                f"This model's maximum context length is {engine.max_model_len} tokens; the prompt has "
                f"{prompt_len} tokens{asked}. Shorten the prompt or lower `{max_param}`.",
                param="messages" if room <= 0 else max_param, code="context_length_exceeded",
            )
        bias: dict[int, float] = {}
        for key, value in (body.logit_bias or {}).items():
            token = int(key)  # ASCII digits, checked by the protocol
            if not 0 <= token < engine.vocab_size:
                raise bad_request(f"logit_bias token id {token} is outside the vocabulary", param="logit_bias")
            bias[token] = value
        return SamplingParams(
            max_tokens=max_new if max_new is not None else room,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0),
            seed=None if body.seed is None else body.seed % 2**63,
            stop=tuple(stop),
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            logit_bias=bias,
            logprobs=logprobs,
            ignore_eos=bool(body.ignore_eos),
            grammar=grammar,
        )

    @staticmethod
    def _refuse_if_surely_too_long(engine: EngineClient, chars: int, param: str) -> None:
        """A text longer than the context could hold even at the tokenizer's longest tokens is refused before
        any work: tokenizing a megabyte of text takes seconds."""
        if chars > engine.max_model_len * engine.max_token_chars:
            raise bad_request(
                f"This model's maximum context length is {engine.max_model_len} tokens; the input has {chars} "
                "characters, more than that many tokens can hold. Shorten it.", param=param,
                code="context_length_exceeded")

    async def _prepare_chat(self, body: ChatCompletionRequest, tenant: str | None) -> _Prepared:
        engine = self._check_common(body)
        found = constraint(body)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        self._refuse_if_surely_too_long(engine, sum(len(str(m.get("content") or "")) for m in messages), "messages")
        tool = found.tool if found is not None else None
        system = tools_prompt(tool, list(found.tools)) if found is not None and tool is not None else None

        def tokenize() -> tuple[str, list[int]]:
            prompt = chat.render(messages, engine.chat_template, system)
            return prompt, engine.encode(prompt)

        prompt, ids = await asyncio.to_thread(tokenize)  # off the event loop: the server answers meanwhile
        grammar = await self._grammar(engine, found)
        stop = body.stop_list()
        # the default stop is for free text (the model writing the user's turn); a grammar ends the reply itself
        free_text = grammar is None or (tool is not None and tool.choice == "auto")
        if self.default_chat_stop and body.default_stop and free_text:
            stop += [s for s in chat.DEFAULT_CHAT_STOP if s not in stop]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self._params(body, len(ids), body.max_new_tokens, stop, logprobs,
                              "max_completion_tokens" if body.max_completion_tokens else "max_tokens", grammar)
        return _Prepared([GenerationRequest(tuple(ids), params, body.n or 1, new_id("req"), cache_salt(body, tenant))],
                         [prompt], tool)

    async def _prepare_completion(self, body: CompletionRequest, tenant: str | None) -> _Prepared:
        engine = self._check_common(body)
        grammar = await self._grammar(engine, constraint(body))
        if body.echo and body.logprobs is not None:
            raise bad_request("echo together with logprobs is not supported", param="echo")
        raw = body.prompt
        if isinstance(raw, str):
            prompts: list[str | list[int]] = [raw]
        elif raw and all(isinstance(p, int) for p in raw):
            prompts = [list(raw)]  # type: ignore[arg-type]
        else:
            prompts = list(raw)  # type: ignore[arg-type]
        if not prompts:
            raise bad_request("prompt must not be empty", param="prompt")
        requests, texts = [], []
        for p in prompts:
            if isinstance(p, str):
                self._refuse_if_surely_too_long(engine, len(p), "prompt")
                ids = await asyncio.to_thread(engine.encode, p)
                text = p
            else:
                if any(not 0 <= t < engine.vocab_size for t in p):
                    raise bad_request("prompt token ids must be inside the vocabulary", param="prompt")
                ids, text = list(p), engine.decode(p)
            if not ids:
                raise bad_request("prompt must not be empty", param="prompt")
            params = self._params(body, len(ids), body.max_new_tokens, body.stop_list(), body.logprobs, "max_tokens",
                                  grammar)
            requests.append(GenerationRequest(tuple(ids), params, body.n or 1, new_id("req"), cache_salt(body, tenant)))
            texts.append(text)
        return _Prepared(requests, texts)

    def _submit(self, prepared: _Prepared) -> list[RequestStream]:
        engine = self._engine()
        streams: list[RequestStream] = []
        try:
            for request in prepared.requests:
                streams.append(engine.submit(request))
        except BaseException:
            for s in streams:
                engine.abort(s)
            raise
        return streams

    # ---------- engine -> responses ----------

    def _token_text(self, token_id: int) -> str:
        return self._engine().decode([token_id])

    def chat_logprobs(self, lps: Seq[TokenLogprob]) -> ChatLogprobs:
        entries = []
        for lp in lps:
            token = self._token_text(lp.token_id)
            top = [TopLogprob(token=(t := self._token_text(i)), logprob=v, bytes=list(t.encode())) for i, v in lp.top]
            entries.append(ChatTokenLogprob(token=token, logprob=lp.logprob, bytes=list(token.encode()),
                                            top_logprobs=top))
        return ChatLogprobs(content=entries)

    def completion_logprobs(self, lps: Seq[TokenLogprob], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in lps:
            token = self._token_text(lp.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self._token_text(i): v for i, v in lp.top})
            out.text_offset.append(offset)
            offset += len(token)
        return out

    @staticmethod
    def _usage(streams: Seq[RequestStream]) -> Usage:
        prompt = sum(s.prompt_tokens for s in streams)
        completion = sum(s.completion_tokens for s in streams)
        cached = PromptTokensDetails(cached_tokens=sum(s.cached_tokens for s in streams))
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=cached)

    async def _events(self, streams: Seq[RequestStream]) -> AsyncIterator[tuple[int, ChoiceEvent]]:
        """Events of all streams as they come, as (choice index across prompts, event); aborts on exit."""
        try:
            if len(streams) == 1:
                async for event in streams[0]:
                    yield event.index, event
                return
            queue: asyncio.Queue[tuple[int, ChoiceEvent] | BaseException | None] = asyncio.Queue()

            async def pump(k: int, stream: RequestStream) -> None:
                try:
                    async for event in stream:
                        await queue.put((k * stream.request.n + event.index, event))
                    await queue.put(None)
                except BaseException as exc:  # delivered to the consumer below
                    await queue.put(exc)

            tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
            try:
                open_streams = len(streams)
                while open_streams:
                    item = await queue.get()
                    if item is None:
                        open_streams -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        yield item
            finally:
                for t in tasks:
                    t.cancel()
        finally:
            self._abort_unfinished(streams)

    def _abort_unfinished(self, streams: Seq[RequestStream]) -> None:
        """Stop what nobody will read any more (the client hung up, or a failure ended the response); once."""
        unfinished = [s for s in streams if not s.finished and not s.aborted]
        for s in unfinished:
            self._engine().abort(s)
        if unfinished:
            usage = self._usage(streams)
            log.info("request aborted after %d prompt + %d completion tokens",
                     usage.prompt_tokens, usage.completion_tokens)

    async def _collect(self, streams: Seq[RequestStream], texts: list[str]
                       ) -> tuple[list[str], list[list[TokenLogprob]], list[str | None]]:
        """Run the streams to their end: each choice's text (after what `texts` holds), logprobs, finish reason."""
        logprobs: list[list[TokenLogprob]] = [[] for _ in texts]
        finish: list[str | None] = [None] * len(texts)
        async for index, event in self._events(streams):
            texts[index] += event.text
            logprobs[index] += event.logprobs
            finish[index] = event.finish_reason or finish[index]
        return texts, logprobs, finish

    async def _sse(self, streams: Seq[RequestStream], chunks: ChunkFormat) -> AsyncIterator[str]:
        """The one SSE loop of chat and completions: opening chunks, a chunk per delta, a finish chunk per
        choice, the usage chunk, then `[DONE]`; a failure becomes an error event; what is left is aborted."""
        try:
            for line in chunks.opening():
                yield line
            async for index, event in self._events(streams):
                if (line := chunks.delta(index, event)) is not None:
                    yield line
                if event.finish_reason is not None:
                    yield chunks.finish(index, event.finish_reason)
            if chunks.include_usage:
                yield chunks.usage(self._usage(streams))
        except Exception as exc:
            yield sse(to_api_error(exc).body())
        finally:  # also when the client hangs up before the first engine event is read
            self._abort_unfinished(streams)
        yield DONE

    # ---------- chat ----------

    async def chat(self, body: ChatCompletionRequest, tenant: str | None = None) -> ChatCompletionResponse:
        prepared = await self._prepare_chat(body, tenant)
        streams = self._submit(prepared)
        n = body.n or 1
        texts, logprobs, finish = await self._collect(streams, [""] * n)
        choices = []
        for i in range(n):
            message, reason = ResponseMessage(content=texts[i]), finish[i]
            if prepared.tool is not None:
                message, reason = tool_reply(prepared.tool, texts[i], reason)
            choices.append(ChatChoice(index=i, message=message, finish_reason=reason,
                                      logprobs=self.chat_logprobs(logprobs[i]) if body.logprobs else None))
        return ChatCompletionResponse(id=new_id("chatcmpl"), created=now(), model=self.model_name,
                                      choices=choices, usage=self._usage(streams))

    async def chat_stream(self, body: ChatCompletionRequest, tenant: str | None = None) -> AsyncIterator[str]:
        """Validate and submit now (errors raise before any byte is sent); return the SSE lines."""
        prepared = await self._prepare_chat(body, tenant)
        streams = self._submit(prepared)
        chunks = ChatChunks(self, body) if prepared.tool is None else ToolCallChunks(self, body, prepared.tool)
        return self._sse(streams, chunks)

    # ---------- completions ----------

    async def completion(self, body: CompletionRequest, tenant: str | None = None) -> CompletionResponse:
        prepared = await self._prepare_completion(body, tenant)
        streams = self._submit(prepared)
        n = body.n or 1
        total = n * len(streams)
        echoed = [prepared.prompt_texts[i // n] if body.echo else "" for i in range(total)]
        texts, logprobs, finish = await self._collect(streams, echoed)
        choices = [
            CompletionChoice(index=i, text=texts[i], finish_reason=finish[i],
                             logprobs=self.completion_logprobs(logprobs[i], 0) if body.logprobs is not None else None)
            for i in range(total)
        ]
        return CompletionResponse(id=new_id("cmpl"), created=now(), model=self.model_name, choices=choices,
                                  usage=self._usage(streams))

    async def completion_stream(self, body: CompletionRequest, tenant: str | None = None) -> AsyncIterator[str]:
        prepared = await self._prepare_completion(body, tenant)
        streams = self._submit(prepared)
        return self._sse(streams, CompletionChunks(self, body, prepared.prompt_texts, len(streams)))

    # ---------- the native BentoML APIs ----------

    async def generate(self, body: GenerateRequest, tenant: str | None = None) -> AsyncIterator[str]:
        """Plain text deltas of the completion of one prompt (validated and submitted now)."""
        request = CompletionRequest(model=self.model_name, **body.model_dump(exclude_none=True))
        streams = self._submit(await self._prepare_completion(request, tenant))
        return self._text(streams)

    async def _text(self, streams: list[RequestStream]) -> AsyncIterator[str]:
        try:
            async for _, event in self._events(streams):
                if event.text:
                    yield event.text
        finally:
            self._abort_unfinished(streams)

    async def chat_reply(self, body: ChatRequest, tenant: str | None = None) -> ChatReply:
        """One reply to a conversation, with its finish reason and usage."""
        request = ChatCompletionRequest(model=self.model_name, **body.model_dump(exclude_none=True))
        response = await self.chat(request, tenant)
        choice = response.choices[0]
        return ChatReply(reply=choice.message.content or "", finish_reason=choice.finish_reason,
                         usage=response.usage)


class ChunkFormat:
    """How one endpoint frames its stream: what `OpenAIServing._sse` asks of it."""

    include_usage: bool

    def opening(self) -> list[str]:
        return []

    def delta(self, index: int, event: ChoiceEvent) -> str | None:
        raise NotImplementedError

    def finish(self, index: int, reason: FinishReason) -> str:
        raise NotImplementedError

    def usage(self, usage: Usage) -> str:
        raise NotImplementedError


class ChatChunks(ChunkFormat):
    """`chat.completion.chunk`s: a role chunk per choice first, content deltas, one finish chunk per choice."""

    def __init__(self, serving: OpenAIServing, body: ChatCompletionRequest) -> None:
        self.serving, self.body = serving, body
        self.include_usage = body.include_usage
        self.rid, self.created = new_id("chatcmpl"), now()
        self.exclude = chunk_exclude(body.include_usage)
        self.text = TextChunks(True, self.rid, self.created, serving.model_name, body.include_usage)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return sse(ChatCompletionChunk(id=self.rid, created=self.created, model=self.serving.model_name,
                                       choices=choices, usage=usage), self.exclude)

    def opening(self) -> list[str]:
        return [self._chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                for i in range(self.body.n or 1)]

    def delta(self, index: int, event: ChoiceEvent) -> str | None:
        if event.text and not self.body.logprobs:
            return self.text(index, event.text)
        if event.text or (self.body.logprobs and event.logprobs):
            lps = self.serving.chat_logprobs(event.logprobs) if self.body.logprobs else None
            return self._chunk([ChatChunkChoice(index=index, delta=DeltaMessage(content=event.text), logprobs=lps)])
        return None

    def finish(self, index: int, reason: FinishReason) -> str:
        return self._chunk([ChatChunkChoice(index=index, delta=DeltaMessage(), finish_reason=reason)])

    def usage(self, usage: Usage) -> str:
        return self._chunk([], usage=usage)


def tool_reply(mode: ToolMode, text: str, reason: str | None) -> tuple[ResponseMessage, str | None]:
    """A whole reply in a tool mode as OpenAI's message: content, or the calls it makes (partial ones too, when
    `max_tokens` cut it); `tool_calls` is the finish reason of a reply that completed its calls."""
    parser = ToolCallParser(mode)
    parser.feed(text)
    parser.finish()
    calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in parser.calls]
    if calls and reason == FinishReason.STOP:
        reason = FinishReason.TOOL_CALLS
    # plain text in auto mode (even ""); beside calls, or a required call cut before its name, no content
    content = parser.content if mode.choice == "auto" and not calls else (parser.content or None)
    return ResponseMessage(content=content, tool_calls=calls or None), reason


class ToolCallChunks(ChatChunks):
    """Chat chunks of a reply in a tool mode: content deltas for plain text, `tool_calls` deltas for calls (a
    call's name and id first, then its arguments as they come); what `tool_reply` gives, in pieces."""

    def __init__(self, serving: OpenAIServing, body: ChatCompletionRequest, mode: ToolMode) -> None:
        super().__init__(serving, body)
        self.parsers = [ToolCallParser(mode) for _ in range(body.n or 1)]

    def opening(self) -> list[str]:
        lines = super().opening()
        for i, parser in enumerate(self.parsers):
            if (piece := parser.opening) is not None:
                lines.append(self._pieces(i, [piece]))
        return lines

    def _pieces(self, index: int, pieces: list[Piece]) -> str:
        lines = []
        for piece in pieces:
            if piece.call is None:
                if piece.content:
                    lines.append(self.text(index, piece.content))
                continue
            call = ToolCallDelta(index=piece.call, function=FunctionCallDelta(arguments=piece.arguments))
            if piece.name is not None:
                call = ToolCallDelta(index=piece.call, id=piece.id, type="function",
                                     function=FunctionCallDelta(name=piece.name, arguments=piece.arguments))
            lines.append(self._chunk([ChatChunkChoice(index=index, delta=DeltaMessage(tool_calls=[call]))]))
        return "".join(lines)

    def delta(self, index: int, event: ChoiceEvent) -> str | None:
        return self._pieces(index, self.parsers[index].feed(event.text)) or None

    def finish(self, index: int, reason: FinishReason) -> str:
        parser = self.parsers[index]
        lines = self._pieces(index, parser.finish())
        if parser.calls and reason == FinishReason.STOP:
            reason = FinishReason.TOOL_CALLS
        return lines + super().finish(index, reason)


class CompletionChunks(ChunkFormat):
    """`text_completion` chunks: the echoed prompts first (with `echo`), text deltas, one finish chunk per choice."""

    def __init__(self, serving: OpenAIServing, body: CompletionRequest, prompt_texts: list[str], prompts: int) -> None:
        self.serving, self.body, self.prompt_texts = serving, body, prompt_texts
        self.include_usage = body.include_usage
        self.n = body.n or 1
        self.rid, self.created = new_id("cmpl"), now()
        self.exclude = chunk_exclude(body.include_usage)
        self.text = TextChunks(False, self.rid, self.created, serving.model_name, body.include_usage)
        self.offsets = [0] * (self.n * prompts)

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return sse(CompletionResponse(id=self.rid, created=self.created, model=self.serving.model_name,
                                      choices=choices, usage=usage), self.exclude)

    def opening(self) -> list[str]:
        if not self.body.echo:
            return []
        return [self._chunk([CompletionChoice(index=i, text=self.prompt_texts[i // self.n])])
                for i in range(len(self.offsets))]

    def delta(self, index: int, event: ChoiceEvent) -> str | None:
        if event.text and self.body.logprobs is None:
            return self.text(index, event.text)
        if event.text or event.logprobs:
            lps = None
            if self.body.logprobs is not None:
                lps = self.serving.completion_logprobs(event.logprobs, self.offsets[index])
            self.offsets[index] += len(event.text)
            return self._chunk([CompletionChoice(index=index, text=event.text, logprobs=lps)])
        return None

    def finish(self, index: int, reason: FinishReason) -> str:
        return self._chunk([CompletionChoice(index=index, text="", finish_reason=reason)])

    def usage(self, usage: Usage) -> str:
        return self._chunk([], usage=usage)
