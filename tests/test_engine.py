"""Engine contract: cached == uncached, insert anywhere, bulk insert, sampling, compiles."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from decode_server.scheduler import DecodeBatch
from shared.engine.engine import Engine, Params
from shared.kv.prefix import Prefix
from shared.sampling_params import SamplingParams
from tests.reference import reference_greedy

# Prompt lengths at and around the bucket edges of the test engine (buckets 8, 16, 32).
PROMPTS = {n: [(37 * i + 11 * n) % 250 + 1 for i in range(n)] for n in (1, 7, 8, 9, 16, 17, 32)}


def decode_greedy(
    engine: Engine, params: Params, prefix: Prefix, steps: int, slot: int = 0
) -> list[int]:
    batch = DecodeBatch(engine)
    batch.insert([prefix], [slot])
    out = [prefix.first_token]
    for _ in range(steps - 1):
        out.append(batch.step(params)[0][slot])
    return out


@pytest.mark.parametrize("length", sorted(PROMPTS))
def test_cached_decode_matches_uncached_forward(engine: Engine, params: Params, length: int):
    prompt = PROMPTS[length]
    steps = 6
    expected = reference_greedy(engine, params, prompt, steps)

    prefix = engine.prefill(params, prompt)
    batch = DecodeBatch(engine)
    batch.insert([prefix], [1])
    seq = [*prompt, prefix.first_token]
    got = [prefix.first_token]
    for _ in range(steps - 1):
        cached = batch.logits(params, [1])[0]
        uncached = engine.reference_logits(params, seq)[-1]
        np.testing.assert_allclose(cached, uncached, rtol=1e-5, atol=1e-4 * np.abs(uncached).max())
        got.append(batch.step(params)[0][1])
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
        batch = DecodeBatch(engine)
        neighbours = [s for s in range(slots) if s != k]
        got = {s: [] for s in neighbours}
        for s, prompt in zip(neighbours, neighbour_prompts, strict=False):
            prefix = engine.prefill(params, prompt)
            batch.insert([prefix], [s])
            got[s].append(prefix.first_token)
        for _ in range(3):  # neighbours are mid-generation when the target arrives
            tokens, _ = batch.step(params)
            for s in neighbours:
                got[s].append(tokens[s])
        batch.insert([target], [k])
        target_tokens = [target.first_token]
        for _ in range(steps - 1):
            tokens, _ = batch.step(params)
            target_tokens.append(tokens[k])
            for s in neighbours:
                got[s].append(tokens[s])
        assert target_tokens == expected, f"slot {k}"
        for i, s in enumerate(neighbours):
            assert got[s] == neighbour_expected[i][: len(got[s])], f"neighbour {s} of slot {k}"
        batch.pages.check()


def test_bulk_insert_equals_one_by_one(engine: Engine, params: Params):
    prompts = [PROMPTS[7], PROMPTS[17], PROMPTS[1]]
    sampling = [SamplingParams(), SamplingParams(0.7, 5, 0.9, seed=3), SamplingParams(top_k=1)]
    prefixes = [
        _numpy_roundtrip(engine.prefill(params, p, sampling=s))
        for p, s in zip(prompts, sampling, strict=True)
    ]
    slots = [3, 0, 2]
    one_by_one = DecodeBatch(engine)
    for prefix, slot in zip(prefixes, slots, strict=True):
        one_by_one.insert([prefix], [slot])
    bulk = DecodeBatch(engine)
    bulk.insert(prefixes, slots)
    assert [one_by_one.pages.pages_of(s) for s in slots] == [bulk.pages.pages_of(s) for s in slots]
    for a, b in zip(jax.tree.leaves(one_by_one.state), jax.tree.leaves(bulk.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    greedy = [prefixes[0].first_token]  # slot 3: PROMPTS[7], greedy
    for _ in range(4):
        tokens = bulk.step(params)
        assert one_by_one.step(params) == tokens
        greedy.append(tokens[0][3])
    assert greedy == reference_greedy(engine, params, prompts[0], 5)


def test_release_stops_a_slot_and_keeps_the_others(engine: Engine, params: Params):
    batch = DecodeBatch(engine)
    batch.insert([engine.prefill(params, PROMPTS[7])], [0])
    batch.insert([engine.prefill(params, PROMPTS[8])], [1])
    owned = batch.pages.pages_of(0)
    batch.release(0)
    assert batch.pages.pages_of(0) == [] and owned
    before = np.asarray(batch.state.lengths).copy()
    tokens, _ = batch.step(params)
    assert set(tokens) == {1}
    lengths = np.asarray(batch.state.lengths)
    assert lengths[0] == before[0] and lengths[1] == before[1] + 1
    assert not bool(batch.state.active[0]) and bool(batch.state.active[1])
    batch.pages.check()
