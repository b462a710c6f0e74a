"""Sampling: greedy equivalences, per-request seeds, top-k / top-p support sets."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from decode_server.scheduler import DecodeBatch
from shared.engine.engine import Engine, Params
from shared.engine.sampling import sample
from shared.kv.prefix import Prefix
from shared.sampling_params import SamplingError, SamplingParams

PROMPT_A = [5, 80, 13, 200, 7, 7, 42]
PROMPT_B = [100, 3, 3, 9, 250, 17, 61, 90, 12, 4, 33]


def run_slots(
    engine: Engine,
    params: Params,
    requests: dict[int, tuple[list[int], SamplingParams]],
    steps: int,
) -> dict[int, list[int]]:
    """Serve several requests together; return each slot's generated tokens."""
    batch = DecodeBatch(engine)
    out: dict[int, list[int]] = {}
    for slot, (prompt, sampling) in requests.items():
        prefix: Prefix = engine.prefill(params, prompt, sampling=sampling)
        batch.insert([prefix], [slot])
        out[slot] = [prefix.first_token]
    for _ in range(steps - 1):
        tokens, _ = batch.step(params)
        for slot in requests:
            out[slot].append(tokens[slot])
    return out


def test_temperature_zero_and_top_k_one_are_greedy(engine: Engine, params: Params):
    greedy = run_slots(engine, params, {0: (PROMPT_A, SamplingParams())}, 8)[0]
    topk1 = SamplingParams(temperature=1.5, top_k=1, seed=9)
    assert run_slots(engine, params, {2: (PROMPT_A, topk1)}, 8)[2] == greedy
    zero = SamplingParams(temperature=0.0, top_k=40, top_p=0.5, seed=123)
    assert run_slots(engine, params, {1: (PROMPT_A, zero)}, 8)[1] == greedy


def test_seed_reproduces_across_slots_and_batch_mixes(engine: Engine, params: Params):
    hot = SamplingParams(temperature=1.0, top_k=0, top_p=0.95, seed=2**40 + 17)
    alone = run_slots(engine, params, {0: (PROMPT_A, hot)}, 10)[0]
    mixed = run_slots(
        engine,
        params,
        {
            3: (PROMPT_A, hot),
            0: (PROMPT_B, SamplingParams(temperature=0.7, top_k=20, seed=1)),
            1: (PROMPT_B, SamplingParams()),
        },
        10,
    )[3]
    assert alone == mixed
    greedy = run_slots(engine, params, {0: (PROMPT_A, SamplingParams())}, 10)[0]
    assert alone != greedy, "temperature 1.0 over 10 tokens should leave the greedy path"


def test_different_seeds_differ(engine: Engine, params: Params):
    runs = {
        seed: run_slots(
            engine, params, {0: (PROMPT_B, SamplingParams(temperature=1.0, seed=seed))}, 10
        )[0]
        for seed in (1, 2, 3)
    }
    assert len({tuple(r) for r in runs.values()}) == 3


def _draws(logits: np.ndarray, **kw: float) -> set[int]:
    """Tokens drawn from one row of logits over 512 positions (= 512 independent keys)."""
    n = 512
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    tokens = sample(
        rows,
        jnp.full((n,), kw.get("temperature", 1.0), jnp.float32),
        jnp.full((n,), kw.get("top_k", 0), jnp.int32),
        jnp.full((n,), kw.get("top_p", 1.0), jnp.float32),
        jnp.zeros((n, 2), jnp.uint32),
        jnp.arange(n, dtype=jnp.int32),
    )
    return set(np.asarray(tokens).tolist())


def test_top_k_and_top_p_bound_the_support():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.06, 0.04]))
    assert _draws(logits) == {0, 1, 2, 3, 4}
    assert _draws(logits, top_k=2) == {0, 1}
    # 0.4 + 0.3 < 0.8 <= 0.4 + 0.3 + 0.2: the nucleus is the top three.
    assert _draws(logits, top_p=0.8) == {0, 1, 2}
    assert _draws(logits, top_p=0.8, top_k=2) == {0, 1}
    assert _draws(logits, top_p=0.01) == {0}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, "temperature=-0.5 must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature=nan"),
        ({"top_p": 0.0}, "top_p=0.0 must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p=1.5 must be in (0, 1]"),
        ({"top_k": -1}, "top_k=-1 must be >= 0"),
        ({"seed": -3}, "seed=-3 must be in [0, 2**64)"),
    ],
)
def test_invalid_sampling_values(kwargs: dict, message: str):
    with pytest.raises(SamplingError) as err:
        SamplingParams(**kwargs)
    assert message in str(err.value)
