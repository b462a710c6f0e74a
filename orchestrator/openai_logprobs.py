"""The engine's per-token logprobs in the OpenAI API's two shapes (completions' legacy
one, chat's), each token named by its own text."""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.frontend import Frontend
from orchestrator.openai_errors import ApiError
from orchestrator.openai_schemas import (
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionLogprobs,
)
from shared.logprobs import TokenLogprob
from shared.transport.types import StatusCode

# OpenAI's stand-in for a logprob too small to write (JSON has no -Infinity).
LOWEST_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return logprob if logprob > LOWEST_LOGPROB else LOWEST_LOGPROB  # -inf and NaN too


class Logprobs:
    """The engine's per-token logprobs (ids and values) in OpenAI's two shapes, with each
    token named by its own text (a piece of a multi-byte character decodes to U+FFFD, and
    then its `bytes` are null: they would not be the token's)."""

    def __init__(self, frontend: Frontend, count: int) -> None:
        self._frontend, self._count = frontend, count

    def _text(self, token_id: int) -> str:
        return self._frontend.token_text(token_id)

    def _check(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob]) -> None:
        if len(logprobs) != len(token_ids):  # the flow guarantees it; never answer garbage
            raise ApiError(
                StatusCode.INTERNAL, f"{len(token_ids)} tokens came with {len(logprobs)} logprobs"
            )

    def completion(
        self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob], offset: int
    ) -> tuple[CompletionLogprobs, int]:
        """The legacy shape for these tokens, their text offsets from `offset` on; and the
        offset after them."""
        self._check(token_ids, logprobs)
        tokens, offsets, tops = [], [], []
        for token_id, logprob in zip(token_ids, logprobs, strict=True):
            text = self._text(token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            top: dict[str, float] = {}
            for alt, value in logprob.top[: self._count]:
                top.setdefault(self._text(alt), _finite(value))  # likeliest first wins a tie
            top.setdefault(text, _finite(logprob.logprob))  # the chosen one, always
            tops.append(top)
        shaped = CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[_finite(lp.logprob) for lp in logprobs],
            top_logprobs=tops,
            text_offset=offsets,
        )
        return shaped, offset

    def chat(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob]) -> ChatLogprobs:
        self._check(token_ids, logprobs)

        def entry(token_id: int, value: float) -> ChatTopLogprob:
            text = self._text(token_id)
            raw = None if "\ufffd" in text else list(text.encode())
            return ChatTopLogprob(token=text, logprob=_finite(value), bytes=raw)

        content = []
        for token_id, logprob in zip(token_ids, logprobs, strict=True):
            chosen = entry(token_id, logprob.logprob)
            top = [entry(alt, value) for alt, value in logprob.top[: self._count]]
            content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=top))
        return ChatLogprobs(content=content)
