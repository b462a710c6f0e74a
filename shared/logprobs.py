"""Per-token log-probabilities: what crosses every boundary from the engine to the client.

No JAX here (the engine computes them, shared/engine/sampling.py), so that the transport
types, the orchestrator and the client can carry them without importing the engine.
"""

from __future__ import annotations

import dataclasses

# The most alternatives a request may ask for at each position. A constant, so that every
# decode step computes the same [B, MAX_TOP_LOGPROBS] shape whatever requests ask (no
# recompile); each request's own count is cut on the host.
MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass(slots=True, frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model's own distribution: the
    log-softmax of the raw logits, before temperature, top-k and top-p reshape the
    distribution the token is drawn from (so it does not depend on how it was sampled).
    `top`: the most likely tokens at that position as (token id, logprob), most likely
    first; the generated token is among them only if it ranks that high."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class LogprobsError(ValueError):
    """A logprobs option out of range; the message names the value and the limit."""


def check_top_logprobs(count: int | None) -> None:
    """None (no logprobs) or a count of alternatives in [0, MAX_TOP_LOGPROBS]."""
    if count is not None and not 0 <= count <= MAX_TOP_LOGPROBS:
        raise LogprobsError(f"top_logprobs={count} must be in [0, {MAX_TOP_LOGPROBS}]")
