"""Token ids -> streamed text: incremental detokenization plus stop strings.

Stop strings may span token boundaries, so the last `longest stop - 1` characters are held
back until the next tokens show they cannot start a match; at the end, whatever is held
is released. On a match, the text before it is the last text sent.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str]):
        self._detok = IncrementalDetokenizer(tokenizer, list(prompt_ids))
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._pending = ""  # decoded, not yet sent
        self.stopped = False

    def push(self, token_ids: Sequence[int]) -> str:
        """Text to send for these tokens (maybe empty). Once `stopped`, always empty."""
        if self.stopped:
            return ""
        for token in token_ids:
            self._pending += self._detok.push(token)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of the stream."""
        if self.stopped:
            return ""
        self._pending += self._detok.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[: min(hits)], ""
            return out
        cut = len(self._pending) if final else max(0, len(self._pending) - self._hold)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out
