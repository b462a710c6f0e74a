"""`Engine.prefill`: one prompt through the chunked prefill program, for tests and
`pdserve generate-local`.

Not a second prefill path: it runs the prompt in chunks of the prefill loop's default
size (the largest prefill bucket) through the engine's own `ChunkPrograms`
(shared/engine/chunked_prefill.py), on a private pool of one prompt's pages, and reads
the KV out with the same gather. What it returns is what a prefill worker pushes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

from shared.engine.base import EngineError, Params, PromptTooLongError, check_tokens
from shared.engine.chunked_prefill import ChunkedPrefill, ChunkRow
from shared.engine.sampling import token_logprob
from shared.kv.pages import pages_for
from shared.kv.prefix import Prefix
from shared.logprobs import check_top_logprobs
from shared.sampling_params import SamplingParams

if TYPE_CHECKING:
    from shared.engine.engine import Engine


class PromptPrefill:
    """A one-row `ChunkedPrefill` over 1 + max_pages_per_slot pages (scratch, then one
    prompt of up to max_seq_len), built on first use. Engine thread only."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._device: ChunkedPrefill | None = None

    @property
    def device(self) -> ChunkedPrefill:
        if self._device is None:
            config = self.engine.config
            pages = 1 + config.max_pages_per_slot
            self._device = ChunkedPrefill(self.engine, pages, config.max_prompt_len, 1)
        return self._device

    def run(
        self,
        params: Params,
        tokens: Sequence[int] | np.ndarray,
        true_length: int | None,
        sampling: SamplingParams | None,
        allow_long: bool,
        logprobs: int | None,
    ) -> Prefix:
        check_top_logprobs(logprobs)
        sampling = sampling or SamplingParams()
        prompt = self.prompt(tokens, true_length, allow_long)
        device = self.device
        pages = list(range(1, 1 + pages_for(len(prompt), self.engine.config.page_size)))
        for start in range(0, len(prompt), device.chunk):
            row = ChunkRow(prompt[start : start + device.chunk], start, pages, sampling)
            out = device.run(params, [row], logprobs is not None)
        first_logprob = None
        if logprobs is not None:
            chosen, ids, values = jax.device_get(out.logprobs)
            first_logprob = token_logprob(chosen[0], ids[0], values[0], logprobs)
        return Prefix(
            cache=device.gather(pages, len(prompt)),
            true_length=len(prompt),
            first_token=int(out.tokens[0]),
            sampling=sampling,
            first_logprob=first_logprob,
        )

    def prompt(
        self, tokens: Sequence[int] | np.ndarray, true_length: int | None, allow_long: bool
    ) -> np.ndarray:
        """`tokens[:true_length]`, checked: in the vocabulary, at most the largest prefill
        bucket (`allow_long`, for resumed requests: up to max_seq_len - 1)."""
        config = self.engine.config
        prompt = np.asarray(tokens, dtype=np.int64).reshape(-1)
        length = len(prompt) if true_length is None else int(true_length)
        if not 0 < length <= len(prompt):
            raise EngineError(
                f"true_length={length} must be in [1, {len(prompt)}] (the tokens given)"
            )
        prompt = prompt[:length]
        check_tokens(prompt, self.engine.model_config.vocab_size)
        if length <= config.max_prompt_len or (allow_long and length < config.max_seq_len):
            return prompt.astype(np.int32)
        if allow_long:
            raise PromptTooLongError(
                f"resumed prompt of {length} tokens leaves no room in max_seq_len "
                f"({config.max_seq_len})"
            )
        raise PromptTooLongError(
            f"prompt of {length} tokens is longer than the largest prefill bucket "
            f"({config.max_prompt_len}); raise --prefill-buckets or shorten the prompt"
        )
