"""Per-token logprobs in the engine: the log-softmax of the model's raw logits (before
temperature, top-k, top-p), for the first token (prefill) and every decode step, equal to
the uncached reference; only for the slots that ask; no new compile. And their wire form
between the workers and the orchestrator."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from decode_server.scheduler import DecodeBatch
from shared.engine.engine import Engine, Params
from shared.logprobs import MAX_TOP_LOGPROBS, LogprobsError, TokenLogprob
from shared.sampling_params import SamplingParams
from shared.transport import convert
from shared.transport.types import (
    DecodeFinish,
    GenerationLimits,
    PrefillRequest,
    PrefillResult,
    PrefillTimings,
    ReserveRequest,
    TokenBatch,
)

PROMPT_A = [5, 80, 13, 200, 7, 7, 42]
PROMPT_B = [100, 3, 3, 9, 250, 17, 61, 90, 12, 4, 33]
TOLERANCE = 1e-5  # the paged decode step and the uncached reference sum in other orders
STEPS = 6
# slot -> (prompt, sampling, alternatives asked for; None: no logprobs). Hot sampling and a
# top-k cut: the logprobs must not depend on them. Bucket sizes are those of the warm-up.
REQUESTS: dict[int, tuple[list[int], SamplingParams, int | None]] = {
    0: (PROMPT_A, SamplingParams(temperature=1.3, seed=5), 3),
    1: (PROMPT_B, SamplingParams(), None),
    3: (PROMPT_B, SamplingParams(temperature=0.8, top_k=5, seed=1), MAX_TOP_LOGPROBS),
}


def serve(
    engine: Engine, params: Params, with_logprobs: bool
) -> tuple[dict[int, list[int]], dict[int, list[TokenLogprob | None]]]:
    """Every request of REQUESTS in one batch -> (generated tokens, their reported
    logprobs: the prefill's first, then `last_logprobs` of each step)."""
    batch = DecodeBatch(engine)
    tokens: dict[int, list[int]] = {}
    reported: dict[int, list[TokenLogprob | None]] = {}
    for slot, (prompt, sampling, count) in REQUESTS.items():
        count = count if with_logprobs else None
        prefix = engine.prefill(params, prompt, sampling=sampling, logprobs=count)
        assert (prefix.first_logprob is None) == (count is None)
        batch.insert([prefix], [slot], logprobs=[count])
        tokens[slot], reported[slot] = [prefix.first_token], [prefix.first_logprob]
    for _ in range(STEPS):
        step, _ = batch.step(params)
        wanted = {s for s, (_, _, n) in REQUESTS.items() if n is not None and with_logprobs}
        assert set(batch.last_logprobs) == wanted  # only the slots that asked
        for slot, token in step.items():
            tokens[slot].append(token)
            reported[slot].append(batch.last_logprobs.get(slot))
    return tokens, reported


def test_engine_logprobs_are_the_log_softmax_of_the_reference_logits(
    engine: Engine, params: Params
):
    plain, _ = serve(engine, params, with_logprobs=False)  # also compiles every shape used
    compiled = engine.compile_counts.copy()
    tokens, reported = serve(engine, params, with_logprobs=True)
    assert engine.compile_counts == compiled, "asking for logprobs compiled something"
    assert tokens == plain, "asking for logprobs changed what was sampled"
    for slot, (prompt, _, count) in REQUESTS.items():
        if count is None:
            assert reported[slot] == [None] * (STEPS + 1)
            continue
        # Row i of the reference predicts position i + 1: the generated tokens' rows.
        sequence = prompt + tokens[slot]
        logits = engine.reference_logits(params, sequence[:-1])[len(prompt) - 1 :]
        expected = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        for i, (token, logprob) in enumerate(zip(tokens[slot], reported[slot], strict=True)):
            assert logprob is not None
            assert abs(logprob.logprob - expected[i, token]) <= TOLERANCE, (slot, i)
            ids = [t for t, _ in logprob.top]
            values = np.array([v for _, v in logprob.top])
            assert len(ids) == count == len(set(ids))
            np.testing.assert_allclose(values, expected[i, ids], atol=TOLERANCE)
            # The likeliest `count`, most likely first: the reference's top values.
            np.testing.assert_allclose(values, np.sort(expected[i])[::-1][:count], atol=TOLERANCE)


def test_zero_alternatives_give_the_token_logprob_alone(engine: Engine, params: Params):
    prefix = engine.prefill(params, PROMPT_A, logprobs=0)
    assert prefix.first_logprob is not None and prefix.first_logprob.top == ()
    expected = jax.nn.log_softmax(engine.reference_logits(params, PROMPT_A)[-1])
    assert abs(prefix.first_logprob.logprob - float(expected[prefix.first_token])) <= TOLERANCE


@pytest.mark.parametrize("count", [-1, MAX_TOP_LOGPROBS + 1])
def test_out_of_range_counts_are_refused(engine: Engine, params: Params, count: int):
    with pytest.raises(LogprobsError, match=f"top_logprobs={count} must be in \\[0, 20\\]"):
        engine.prefill(params, PROMPT_A, logprobs=count)
    with pytest.raises(LogprobsError):
        DecodeBatch(engine).insert([engine.prefill(params, PROMPT_A)], [0], logprobs=[count])
    with pytest.raises(LogprobsError):
        ReserveRequest("r", 3, GenerationLimits(4), 10.0, logprobs=count)


def test_logprobs_survive_the_worker_protos():
    """TokenBatch, the Reserve and Prefill options and the prefill's first logprob, through
    worker.proto and back (the fake transport hands the domain objects over as they are)."""
    lp = TokenLogprob(-0.5, ((7, -0.5), (9, -1.25)))
    batch = TokenBatch((7, 9), DecodeFinish.LENGTH, "", (lp, TokenLogprob(-3.0)))
    assert convert.tokens_from_proto(convert.tokens_to_proto(batch)) == batch
    plain = TokenBatch((7,))
    assert convert.tokens_from_proto(convert.tokens_to_proto(plain)) == plain
    for count in (None, 0, 5):
        reserve = ReserveRequest("r", 3, GenerationLimits(4), 10.0, logprobs=count)
        assert convert.reserve_from_proto(convert.reserve_to_proto(reserve)) == reserve
        prefill = PrefillRequest("r", (1, 2), SamplingParams(), "d:1", "l", logprobs=count)
        assert convert.prefill_from_proto(convert.prefill_to_proto(prefill)) == prefill
    timings = PrefillTimings(0.0, 0.0, 0.0, 0)
    for first in (None, lp):
        result = PrefillResult(5, timings, first)
        assert convert.prefill_result_from_proto(convert.prefill_result_to_proto(result)) == result
