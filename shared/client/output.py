"""What `pdserve generate` and `pdserve generate-local` print: one format for both.

With `--json`, JSON lines:

    {"token_id": 72, "text": "H"}
        one per generated token, in order; `text` is what became printable with this token
        (may be "": bytes of an incomplete UTF-8 character wait for the next token)
    {"finish_reason": "length", "usage": {"prompt_tokens": 5, "completion_tokens": 8}, "text": ""}
        the last line: why the generation ended ("stop", "length", "cancelled", "deadline",
        "error"), the token counts, and any text released only at the end

The end-of-sequence token (or a stop token) is never printed as a token: it ends the
stream with `"finish_reason": "stop"` and is not counted in `completion_tokens`.

Without `--json`, the text goes to stdout as it comes, then a newline; the finish reason
and the token count go to stderr as `[finish: REASON, N tokens]`.
"""

from __future__ import annotations

import json
from typing import TextIO

from shared.client.generator import Chunk


class StreamPrinter:
    """Prints a stream of `Chunk`s (the server's responses, or generate-local's own)."""

    def __init__(self, out: TextIO, err: TextIO, *, json_lines: bool) -> None:
        self._out, self._err, self._json = out, err, json_lines
        self._pending = ""  # text of a chunk without tokens, printed with the next line

    def write(self, chunk: Chunk) -> None:
        if not self._json:
            self._out.write(chunk.text)
            if chunk.finish_reason is not None:
                self._out.write("\n")
                self._err.write(
                    f"[finish: {chunk.finish_reason}, {chunk.completion_tokens} tokens]\n"
                )
            self._out.flush()
            return
        text, self._pending = self._pending + chunk.text, ""
        last = len(chunk.token_ids) - 1
        for i, token in enumerate(chunk.token_ids):
            # A response may carry several tokens with the text of them all: it goes with
            # the last one, which is when it became printable.
            self._line({"token_id": token, "text": text if i == last else ""})
        if chunk.finish_reason is not None:
            usage = {
                "prompt_tokens": chunk.prompt_tokens,
                "completion_tokens": chunk.completion_tokens,
            }
            tail = text if not chunk.token_ids else ""
            self._line({"finish_reason": chunk.finish_reason, "usage": usage, "text": tail})
        elif not chunk.token_ids:
            self._pending = text

    def _line(self, row: dict) -> None:
        self._out.write(json.dumps(row) + "\n")
        self._out.flush()
