"""The public Generate API in domain terms: validate, tokenize, stream text, account.

The servicer turns protos into `GenerateInput` and `GenerateOutput`s back into protos;
everything a frontend can observe is decided here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

from orchestrator.admission import QueueFullError
from orchestrator.flow import Delta, FinishReason, GenerateFlow, GenerateJob, RequestFailed
from orchestrator.outbox import ConsumerTooSlow, Outbox
from orchestrator.text import TextStream
from shared.chat import ChatError, ChatMessage, render_chat
from shared.config import ModelConfig
from shared.logprobs import LogprobsError, TokenLogprob, check_top_logprobs
from shared.metrics import OrchestratorMetrics
from shared.sampling_params import SamplingError, SamplingParams
from shared.tokenizer import ChatFormat, Tokenizer
from shared.transport.types import StatusCode

MAX_REQUEST_ID_CHARS = 128


class InvalidRequest(ValueError):
    """A field is out of range; the message names it, its value and the limit."""


@dataclasses.dataclass(slots=True, frozen=True)
class GenerateInput:
    request_id: str
    text: str | None
    token_ids: tuple[int, ...] | None
    max_tokens: int  # 0: the default
    sampling: SamplingParams | None  # None: greedy
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    timeout_seconds: float = 0.0  # 0: none beyond the call's deadline
    messages: tuple[ChatMessage, ...] | None = None  # the third prompt form: chat
    # None: no logprobs (nothing computed); N: each token's and N alternatives, [0, 20].
    logprobs: int | None = None


@dataclasses.dataclass(slots=True, frozen=True)
class GenerateOutput:
    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when the request asked


@dataclasses.dataclass(slots=True, frozen=True)
class FrontendLimits:
    max_tokens_limit: int
    default_max_tokens: int = 256
    max_stop_strings: int = 16
    max_stop_chars: int = 256  # per stop string
    max_unsent_tokens: int = 1024  # a stream's output waiting for a slow client (outbox.py)


@dataclasses.dataclass(slots=True)
class _Tally:
    """What one stream has produced so far: for its last response and its metrics."""

    completion: int = 0  # tokens streamed
    token_times: list[float] = dataclasses.field(default_factory=list)  # one per token
    finish: FinishReason | None = None
    code: StatusCode | None = StatusCode.INTERNAL  # the status it ends with (None: OK)


class Frontend:
    def __init__(
        self,
        flow: GenerateFlow,
        tokenizer: Tokenizer,
        model: ModelConfig,
        limits: FrontendLimits,
        metrics: OrchestratorMetrics,
        chat: ChatFormat | None = None,
    ) -> None:
        self._flow, self._tok, self._model, self._chat = flow, tokenizer, model, chat
        self._limits, self._metrics = limits, metrics
        self.draining = False
        self.in_flight = 0

    async def generate(
        self, request: GenerateInput, call_time_left: float | None
    ) -> AsyncIterator[GenerateOutput]:
        """Stream one request. Raises InvalidRequest, QueueFullError, RequestFailed; a
        cancelled caller cancels it."""
        arrived = time.perf_counter()
        if self.draining:
            raise RequestFailed(StatusCode.UNAVAILABLE, "orchestrator is shutting down")
        job, own_timeout = self._job(request, call_time_left)
        text = TextStream(self._tok, job.prompt_ids, request.stop)
        self._metrics.prompt_tokens.inc(len(job.prompt_ids))
        tally = _Tally()
        loop = asyncio.get_running_loop()
        deadline = None if own_timeout is None else loop.time() + own_timeout
        # The job's deadline is the tighter of the two; when it is the call's, the workers
        # ending the request "deadline" means the call's deadline passed, and its status
        # must say so (a clean end would read as a complete answer to the caller).
        call_deadline_first = call_time_left is not None and (
            own_timeout is None or call_time_left < own_timeout
        )
        self.in_flight += 1
        try:
            outputs = self._stream(job, text, tally, deadline, call_deadline_first)
            async with contextlib.aclosing(outputs) as stream:
                async for out in stream:
                    yield out
            tally.code = StatusCode.UNKNOWN if tally.finish is None else None
        except TimeoutError:
            if deadline is None or loop.time() < deadline:
                # The call's own deadline (the tighter one) passed: its status says so.
                tally.code = StatusCode.DEADLINE_EXCEEDED
                raise RequestFailed(tally.code, "the call's deadline passed") from None
            tally.finish = FinishReason.DEADLINE  # timeout_seconds: the stream ends cleanly
            prompt_tokens = len(job.prompt_ids)
            yield GenerateOutput(
                job.request_id, (), text.finish(), tally.finish, prompt_tokens, tally.completion
            )
            tally.code = None
        except asyncio.CancelledError:
            tally.finish, tally.code = FinishReason.CANCELLED, StatusCode.CANCELLED
            raise
        except (RequestFailed, QueueFullError) as err:
            tally.code = getattr(err, "code", StatusCode.RESOURCE_EXHAUSTED)
            if isinstance(err, ConsumerTooSlow):
                self._metrics.slow_consumers.inc()
            raise
        finally:
            self.in_flight -= 1
            self._account(arrived, tally.token_times, tally.finish, tally.code)

    async def _stream(
        self,
        job: GenerateJob,
        text: TextStream,
        tally: _Tally,
        deadline: float | None,
        call_deadline_first: bool,
    ) -> AsyncIterator[GenerateOutput]:
        """The flow's deltas as outputs, counted in `tally`, until a finish; TimeoutError
        at `deadline` (event-loop time; None: none)."""
        loop = asyncio.get_running_loop()
        async with Outbox(self._flow.run(job), self._limits.max_unsent_tokens) as deltas:
            while tally.finish is None:
                # The request's own timeout covers waiting for the flow, never a `yield`:
                # while suspended there, the caller (grpc.aio writing the last response)
                # would get our cancellation, and grpc.aio takes a CancelledError in a
                # handler for the client's own cancel, so it ends the RPC without a status
                # and the client waits forever.
                if deadline is not None and loop.time() >= deadline:
                    raise TimeoutError  # tokens may be queued: anext would not wait
                async with asyncio.timeout_at(deadline):
                    delta = await deltas.get()
                if delta is None:
                    return
                if delta.finish is FinishReason.DEADLINE and call_deadline_first:
                    tally.code = StatusCode.DEADLINE_EXCEEDED
                    raise RequestFailed(tally.code, "the call's deadline passed")
                tally.token_times += [time.perf_counter()] * len(delta.token_ids)
                tally.completion += len(delta.token_ids)
                for out in self._outputs(job, text, delta, tally.completion):
                    tally.finish = out.finish
                    yield out

    def _outputs(
        self, job: GenerateJob, text: TextStream, delta: Delta, completion: int
    ) -> list[GenerateOutput]:
        """The responses for one delta. The last response of a stream carries no tokens:
        the finish reason, the usage, and any text held back until the end."""
        outputs = []
        piece = text.push(delta.token_ids)
        if delta.token_ids or piece:
            outputs.append(
                GenerateOutput(job.request_id, delta.token_ids, piece, logprobs=delta.logprobs)
            )
        finish = FinishReason.STOP if text.stopped else delta.finish
        if finish is not None:
            outputs.append(
                GenerateOutput(
                    job.request_id, (), text.finish(), finish, len(job.prompt_ids), completion
                )
            )
        return outputs

    def _account(
        self,
        arrived: float,
        token_times: list[float],
        finish: FinishReason | None,
        code: StatusCode | None,
    ) -> None:
        now = time.perf_counter()
        self._metrics.e2e_seconds.observe(now - arrived)
        if token_times:
            self._metrics.ttft_seconds.observe(token_times[0] - arrived)
            self._metrics.generated_tokens.inc(len(token_times))
        if len(token_times) > 1:
            tpot = (token_times[-1] - token_times[0]) / (len(token_times) - 1)
            self._metrics.tpot_seconds.observe(tpot)
        reason = finish.value if finish is not None else "none"
        self._metrics.requests.labels(reason, "OK" if code is None else code.name).inc()

    # Validation -------------------------------------------------------------------------------

    def _job(
        self, r: GenerateInput, call_time_left: float | None
    ) -> tuple[GenerateJob, float | None]:
        """Check every field; returns the job and the request's own timeout (seconds)."""
        if len(r.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequest(
                f"request_id has {len(r.request_id)} characters; the limit "
                f"is {MAX_REQUEST_ID_CHARS}"
            )
        prompt = self._prompt(r)
        limit = self._limits.max_tokens_limit
        if r.max_tokens < 0 or r.max_tokens > limit:
            raise InvalidRequest(f"max_tokens={r.max_tokens} must be in [0, {limit}] (0: default)")
        max_tokens = r.max_tokens or min(self._limits.default_max_tokens, limit)
        limits = self._limits
        if len(r.stop) > limits.max_stop_strings:
            raise InvalidRequest(
                f"{len(r.stop)} stop strings; the limit is {limits.max_stop_strings}"
            )
        for s in r.stop:
            if not s or len(s) > limits.max_stop_chars:
                shown = s if len(s) <= 40 else f"{s[:40]}... ({len(s)} characters)"
                raise InvalidRequest(
                    f"stop string {shown!r} must have 1 to {limits.max_stop_chars} characters"
                )
        self._check_ids("stop_token_ids", r.stop_token_ids)
        stop_ids = tuple(r.stop_token_ids)
        if r.messages is not None and not r.ignore_eos:
            # The end of the assistant's turn ends a chat answer, as EOS does.
            stop_ids += tuple(i for i in self._chat.end_of_turn_ids if i not in stop_ids)
        try:
            check_top_logprobs(r.logprobs)
        except LogprobsError as err:
            raise InvalidRequest(str(err)) from None
        if not r.timeout_seconds >= 0:
            raise InvalidRequest(f"timeout_seconds={r.timeout_seconds} must be >= 0")
        timeouts = [t for t in (r.timeout_seconds or None, call_time_left) if t is not None]
        own = min(timeouts) if timeouts else None
        deadline = None if own is None else time.time() + own
        job = GenerateJob(
            request_id=r.request_id or uuid.uuid4().hex,
            prompt_ids=prompt,
            max_tokens=max_tokens,
            sampling=r.sampling or SamplingParams(),
            stop_token_ids=stop_ids,
            stop_on_eos=not r.ignore_eos,
            deadline=deadline,
            logprobs=r.logprobs,
        )
        # The call's own deadline is enforced by gRPC itself; ours only ends the stream
        # cleanly (FINISH_REASON_DEADLINE) when timeout_seconds is the tighter one.
        return job, r.timeout_seconds or None

    def _prompt(self, r: GenerateInput) -> tuple[int, ...]:
        if r.text is None and r.token_ids is None and r.messages is None:
            raise InvalidRequest("the prompt is missing: set `text`, `tokens` or `chat`")
        if r.token_ids is not None:
            ids = tuple(r.token_ids)
            self._check_ids("tokens.ids", ids)
        elif r.messages is not None:
            ids = tuple(self._tok.encode(self.render_chat(r.messages), add_bos=False))
        else:
            ids = tuple(self._tok.encode(r.text))
        if not ids:
            raise InvalidRequest("the prompt is empty")
        return ids

    def render_chat(self, messages: tuple[ChatMessage, ...]) -> str:
        """The prompt text of a chat; InvalidRequest when the model has no template or the
        template refuses the messages."""
        if self._chat is None:
            raise InvalidRequest(
                f"model {self._model.name!r} has no chat template: send `text` or `tokens`"
            )
        try:
            return render_chat(self._chat, messages)
        except ChatError as err:
            raise InvalidRequest(f"chat: {err}") from None

    def token_text(self, token_id: int) -> str:
        """One token's text on its own (a piece of a multi-byte character decodes to
        U+FFFD): what the OpenAI API's logprobs name tokens by."""
        return self._tok.decode([token_id])

    def _check_ids(self, field: str, ids: tuple[int, ...]) -> None:
        vocab = self._model.vocab_size
        for i in ids:
            if not 0 <= i < vocab:
                raise InvalidRequest(
                    f"{field} has token id {i}, outside the vocabulary [0, {vocab})"
                )


def sampling_from_fields(temperature: float, top_k: int, top_p: float, seed: int) -> SamplingParams:
    """Proto fields -> SamplingParams (top_p 0 on the wire means unset, i.e. 1)."""
    try:
        return SamplingParams(temperature, top_k, top_p or 1.0, seed)
    except SamplingError as err:
        raise InvalidRequest(str(err)) from None
