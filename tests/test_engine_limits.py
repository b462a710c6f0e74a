"""Compile counts and bad input to the engine."""

from __future__ import annotations

import numpy as np
import pytest

from decode_server.scheduler import DecodeBatch
from shared.config import ConfigError, EngineConfig, ModelConfig
from shared.engine.engine import (
    Engine,
    EngineError,
    Params,
    PromptTooLongError,
    SlotError,
    TokenOutOfVocabularyError,
)
from shared.kv.pages import pages_for


def test_generate_compiles_once_per_batch_bucket_while_slots_fill_and_empty(
    engine: Engine, params: Params
):
    """100 steps with requests arriving and leaving: one trace of `generate` per batch
    bucket (the live rows, padded to a power of two); prompts of every length share one
    chunk program (one rows bucket) and one gather per power-of-two page count."""
    before = engine.compile_counts.copy()
    rng = np.random.default_rng(0)
    batch = DecodeBatch(engine)
    remaining = {}
    batch_sizes, page_counts = set(), set()
    for _ in range(100):
        free = [s for s in range(engine.config.max_slots) if s not in remaining]
        if free and rng.random() < 0.4:
            n = int(rng.integers(1, engine.config.max_prompt_len + 1))
            page_counts.add(1 << (pages_for(n, engine.config.page_size) - 1).bit_length())
            batch.insert([engine.prefill(params, rng.integers(0, 256, n))], [free[0]])
            remaining[free[0]] = int(rng.integers(1, 12))
        if remaining:
            batch_sizes.add(engine.batch_bucket(len(remaining)))
            batch.step(params)
        for slot in [s for s, left in remaining.items() if left <= 1]:
            batch.release(slot)
            del remaining[slot]
        remaining = {s: left - 1 for s, left in remaining.items()}
    traced = engine.compile_counts - before
    assert engine.batch_buckets == (1, 2, 4)
    assert batch_sizes == {1, 2, 4}, "the scenario should visit every bucket"
    assert page_counts == {1, 2, 4}, "the scenario should read out every page count"
    for size in batch_sizes:
        assert engine.compile_counts[f"generate[{size}]"] == 1
    assert engine.compile_counts["release"] == 1
    batch.pages.check()
    # At most once each (the session engine may have compiled them in an earlier test),
    # and nothing else: no program of its own for any prompt length.
    prefill = {k: v for k, v in traced.items() if k.startswith(("chunk", "gather"))}
    assert set(prefill) <= {"chunk[1x32]", "gather[1]", "gather[2]", "gather[4]"}, prefill
    assert set(prefill.values()) <= {1}, prefill


def test_bulk_insert_compiles_per_power_of_two_not_per_slot_set(engine: Engine, params: Params):
    prefix = engine.prefill(params, [1, 2, 3])
    pages = [[1], [2]]
    engine.bulk_insert([prefix, prefix], engine.init_decode_state(), [0, 1], pages)
    key = "insert[2x8]"
    count = engine.compile_counts[key]
    for slots in ([2, 3], [3, 0], [1, 2]):
        engine.bulk_insert([prefix, prefix], engine.init_decode_state(), slots, pages)
    assert engine.compile_counts[key] == count


def test_prompt_longer_than_largest_bucket(engine: Engine, params: Params):
    with pytest.raises(PromptTooLongError, match=r"prompt of 33 tokens .* largest prefill bucket"):
        engine.prefill(params, list(range(33)))


@pytest.mark.parametrize("bad", [-1, 320, 10_000])
def test_token_outside_vocabulary(engine: Engine, params: Params, bad: int):
    with pytest.raises(TokenOutOfVocabularyError, match=rf"token id {bad} .*\[0, 320\)"):
        engine.prefill(params, [1, bad, 2])


def test_empty_prompt(engine: Engine, params: Params):
    with pytest.raises(EngineError, match="true_length=0"):
        engine.prefill(params, [])


@pytest.mark.parametrize("slot", [-1, 4, 99])
def test_slot_out_of_range(engine: Engine, params: Params, slot: int):
    prefix = engine.prefill(params, [1, 2, 3])
    with pytest.raises(SlotError, match=rf"slot {slot} is out of range \[0, 4\)"):
        engine.insert(prefix, engine.init_decode_state(), slot, [1])
    with pytest.raises(SlotError, match="out of range"):
        engine.release(engine.init_decode_state(), slot)


def test_duplicate_slots_in_bulk_insert(engine: Engine, params: Params):
    prefix = engine.prefill(params, [1, 2, 3])
    with pytest.raises(SlotError, match="same slot twice"):
        engine.bulk_insert([prefix, prefix], engine.init_decode_state(), [1, 1], [[1], [2]])


def test_insert_needs_pages_for_the_prefix_and_its_first_step(engine: Engine, params: Params):
    prefix = engine.prefill(params, list(range(1, 9)))  # 8 tokens: a whole page of 8
    with pytest.raises(SlotError, match=r"8 tokens needs 2 pages .* got 1"):
        engine.insert(prefix, engine.init_decode_state(), 0, [1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_slots": 0}, "max_slots=0 must be > 0"),
        ({"prefill_buckets": (16, 8)}, "strictly increasing"),
        ({"prefill_buckets": (64,), "max_seq_len": 64}, "largest prefill bucket (64)"),
        ({"dtype": "float16"}, "dtype='float16'"),
        ({"page_size": 12}, "page_size=12 must be a power of two"),
        ({"num_pages": 1}, "num_pages=1 must be >= 2"),
        ({"attention": "flash"}, "attention='flash'"),
    ],
)
def test_engine_config_validation(kwargs: dict, message: str):
    with pytest.raises(ConfigError) as err:
        EngineConfig(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("page_size", [1, 8, 16, 32, 64, 128, 256])
def test_the_attention_reads_whole_divisions_of_a_table_row(page_size: int):
    """On CPU a read of about 64 positions, elsewhere the table's block (about 128): either
    way a whole number of reads makes a table row, as the loop over it needs."""
    config = EngineConfig(max_seq_len=1000, page_size=page_size)
    block, cpu, tpu = (
        config.pages_per_block,
        config.read_pages_per_block("cpu"),
        config.read_pages_per_block("tpu"),
    )
    assert tpu == block and block % cpu == 0 and config.max_pages_per_slot % cpu == 0
    assert cpu * page_size == max(64, page_size) and block * page_size == max(128, page_size)


def test_model_config_validation():
    with pytest.raises(ConfigError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        ModelConfig(
            name="bad",
            vocab_size=10,
            d_model=8,
            num_layers=1,
            num_heads=6,
            num_kv_heads=4,
            head_dim=4,
            ffn_dim=8,
            bos_id=None,
            eos_id=None,
        )


def test_dtype_auto_is_float32_on_cpu_and_explicit_values_pass_through():
    from shared.serving.worker_config import resolve_dtype

    assert resolve_dtype("auto") == "float32"  # the tests run with JAX_PLATFORMS=cpu
    assert resolve_dtype("bfloat16") == "bfloat16"
    assert EngineConfig.default_dtype_for_platform("tpu") == "bfloat16"


def test_prompts_past_the_largest_bucket_only_for_resumes(engine: Engine, params: Params):
    prompt = [1 + i % 250 for i in range(40)]  # > largest bucket (32), < max_seq_len (64)
    with pytest.raises(PromptTooLongError, match="largest prefill bucket"):
        engine.prefill(params, prompt)
    prefix = engine.prefill(params, prompt, allow_long=True)
    assert prefix.first_token == int(np.argmax(engine.reference_logits(params, prompt)[-1]))
    batch = DecodeBatch(engine)
    batch.insert([prefix.trimmed()], [1])
    seq = [*prompt, prefix.first_token]
    for _ in range(5):
        token = batch.step(params)[0][1]
        assert token == int(np.argmax(engine.reference_logits(params, seq)[-1]))
        seq.append(token)
    with pytest.raises(PromptTooLongError, match="leaves no room in max_seq_len"):
        engine.prefill(params, [1] * 64, allow_long=True)
