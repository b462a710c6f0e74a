"""Engine contract: cached == uncached, insert anywhere, bulk insert, sampling, compiles."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from shared.engine.engine import Engine, Params, Prefix
from shared.engine.sampling import SamplingParams
from tests.reference import reference_greedy

# Prompt lengths at and around the bucket edges of the test engine (buckets 8, 16, 32).
PROMPTS = {n: [(37 * i + 11 * n) % 250 + 1 for i in range(n)] for n in (1, 7, 8, 9, 16, 17, 32)}


def decode_greedy(
    engine: Engine, params: Params, prefix: Prefix, steps: int, slot: int = 0
) -> list[int]:
    state = engine.insert(prefix, engine.init_decode_state(), slot)
    out = [prefix.first_token]
    for _ in range(steps - 1):
        state, tokens = engine.generate(params, state)
        out.append(int(tokens[slot]))
    return out


@pytest.mark.parametrize("length", sorted(PROMPTS))
def test_cached_decode_matches_uncached_forward(engine: Engine, params: Params, length: int):
    prompt = PROMPTS[length]
    steps = 6
    expected = reference_greedy(engine, params, prompt, steps)

    prefix = engine.prefill(params, prompt)
    state = engine.insert(prefix, engine.init_decode_state(), slot=1)
    seq = [*prompt, prefix.first_token]
    got = [prefix.first_token]
    for _ in range(steps - 1):
        cached = engine.decode_logits(params, state)[1]
        uncached = engine.reference_logits(params, seq)[-1]
        np.testing.assert_allclose(cached, uncached, rtol=1e-5, atol=1e-4 * np.abs(uncached).max())
        state, tokens = engine.generate(params, state)
        got.append(int(tokens[1]))
        seq.append(got[-1])
    assert got == expected


def test_greedy_margins_are_decisive(engine: Engine, params: Params):
    """The tiny preset's init scale keeps top-2 logit gaps far above float rounding, so the
    exactness tests cannot flake on near-ties."""
    for prompt in PROMPTS.values():
        logits = engine.reference_logits(params, prompt)
        top2 = np.sort(logits, axis=-1)[:, -2:]
        assert np.min(top2[:, 1] - top2[:, 0]) > 1e-3


def test_prefill_first_token_is_reference_argmax(engine: Engine, params: Params):
    for prompt in PROMPTS.values():
        prefix = engine.prefill(params, prompt)
        assert prefix.first_token == int(np.argmax(engine.reference_logits(params, prompt)[-1]))
        assert prefix.true_length == len(prompt)


def _numpy_roundtrip(prefix: Prefix) -> Prefix:
    """What a wire transfer does: trimmed host arrays, copied to fresh buffers."""
    trimmed = prefix.trimmed()
    return dataclasses.replace(trimmed, cache=jax.tree.map(np.array, trimmed.cache))


def test_insert_into_every_slot_with_busy_neighbours(engine: Engine, params: Params):
    slots = engine.config.max_slots
    target_prompt, steps = PROMPTS[9], 8
    expected = reference_greedy(engine, params, target_prompt, steps)
    neighbour_prompts = [PROMPTS[n] for n in (7, 16, 17, 8)]
    neighbour_expected = [reference_greedy(engine, params, p, 14) for p in neighbour_prompts]
    target = _numpy_roundtrip(engine.prefill(params, target_prompt))
    assert all(leaf.shape[1] == 9 for leaf in jax.tree.leaves(target.cache))

    for k in range(slots):
        state = engine.init_decode_state()
        neighbours = [s for s in range(slots) if s != k]
        got = {s: [] for s in neighbours}
        for s, prompt in zip(neighbours, neighbour_prompts, strict=False):
            prefix = engine.prefill(params, prompt)
            state = engine.insert(prefix, state, s)
            got[s].append(prefix.first_token)
        for _ in range(3):  # neighbours are mid-generation when the target arrives
            state, tokens = engine.generate(params, state)
            for s in neighbours:
                got[s].append(int(tokens[s]))
        state = engine.insert(target, state, k)
        target_tokens = [target.first_token]
        for _ in range(steps - 1):
            state, tokens = engine.generate(params, state)
            target_tokens.append(int(tokens[k]))
            for s in neighbours:
                got[s].append(int(tokens[s]))
        assert target_tokens == expected, f"slot {k}"
        for i, s in enumerate(neighbours):
            assert got[s] == neighbour_expected[i][: len(got[s])], f"neighbour {s} of slot {k}"


def test_bulk_insert_equals_one_by_one(engine: Engine, params: Params):
    prompts = [PROMPTS[7], PROMPTS[17], PROMPTS[1]]
    sampling = [SamplingParams(), SamplingParams(0.7, 5, 0.9, seed=3), SamplingParams(top_k=1)]
    prefixes = [
        _numpy_roundtrip(engine.prefill(params, p, sampling=s))
        for p, s in zip(prompts, sampling, strict=True)
    ]
    slots = [3, 0, 2]
    one_by_one = engine.init_decode_state()
    for prefix, slot in zip(prefixes, slots, strict=True):
        one_by_one = engine.insert(prefix, one_by_one, slot)
    bulk = engine.bulk_insert(prefixes, engine.init_decode_state(), np.asarray(slots, np.int32))
    for a, b in zip(jax.tree.leaves(one_by_one), jax.tree.leaves(bulk), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for _ in range(4):
        one_by_one, t1 = engine.generate(params, one_by_one)
        bulk, t2 = engine.generate(params, bulk)
        np.testing.assert_array_equal(np.asarray(t1), np.asarray(t2))


def test_release_stops_a_slot_and_keeps_the_others(engine: Engine, params: Params):
    state = engine.init_decode_state()
    state = engine.insert(engine.prefill(params, PROMPTS[7]), state, 0)
    state = engine.insert(engine.prefill(params, PROMPTS[8]), state, 1)
    state = engine.release(state, 0)
    before = np.asarray(state.lengths).copy()
    state, _ = engine.generate(params, state)
    lengths = np.asarray(state.lengths)
    assert lengths[0] == before[0] and lengths[1] == before[1] + 1
    assert not bool(state.active[0]) and bool(state.active[1])
