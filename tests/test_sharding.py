"""Tensor parallelism on simulated CPU devices (tests/conftest.py gives this process 8).

The `tiny` model has 8 query heads and 2 KV heads, so TP=2 splits the KV heads and TP=4
and TP=8 replicate them (2x, 4x): both layouts of shared/engine/mesh.py are exercised.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import pytest

from decode_server.scheduler import DecodeBatch
from shared.config import ConfigError, EngineConfig, ModelConfig
from shared.engine.base import sampling_rows
from shared.engine.engine import Engine, Params
from shared.engine.mesh import Parallelism, make_mesh, valid_tensor_parallel
from shared.sampling_params import SamplingParams
from shared.serving.capacity import device_memory, kv_bytes_per_token, plan_capacity
from shared.weights.checkpoint import load_model, save_checkpoint
from shared.weights.tree import flatten
from tests.reference import reference_greedy

# TP=4 has more devices than the 2 KV heads (each replicated twice); TP=8 (4x) is built
# only where its layout is the point, not to rerun what TP=4 already showed.
TPS = (1, 2, 4)
CONFIG = EngineConfig(max_slots=4, prefill_buckets=(8, 16), max_seq_len=64)
# Mixed lengths, page-free edges: 1, a bucket edge (8), just past it (9), the largest (16).
PROMPTS = [[256, 5], [256, *range(1, 8)], [256, *range(40, 48)], [256, *range(100, 115)]]
STEPS = 40

pytestmark = pytest.mark.timeout(120)  # each TP size compiles its own programs


class PerTp(dict):
    """Built on first use, once per TP size for the module: a test pays only for the
    sizes it reads, and no single fixture compiles every size at once."""

    def __init__(self, make: Callable[[int], Any]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, tp: int) -> Any:
        self[tp] = value = self._make(tp)
        return value


@pytest.fixture(scope="module")
def engines(tiny_config: ModelConfig) -> PerTp:
    return PerTp(lambda tp: Engine(tiny_config, CONFIG, make_mesh(tp)))


@pytest.fixture(scope="module")
def tp_params(engines: PerTp) -> PerTp:
    return PerTp(lambda tp: engines[tp].init_params(seed=0))


def run_scenario(engine: Engine, params: Params) -> tuple[list[list[int]], list[np.ndarray]]:
    """Prefill every prompt; insert one, bulk_insert two, later the last into a freed slot;
    STEPS steps with slots filling and emptying. Returns each step's live tokens and the
    logits at two steps."""
    prefixes = [engine.prefill(params, p) for p in PROMPTS]
    batch = DecodeBatch(engine)
    batch.insert(prefixes[:1], [0])
    batch.insert(prefixes[1:3], [1, 2])
    steps, logits = [[p.first_token for p in prefixes]], []
    for step in range(STEPS):
        if step in (5, 30):
            logits.append(batch.logits(params, batch.live_slots))
        if step == 10:
            batch.release(1)
        if step == 15:
            batch.insert(prefixes[3:], [1])
        tokens, _ = batch.step(params)
        steps.append([tokens[s] for s in sorted(tokens)])
    batch.pages.check()
    return steps, logits


@pytest.fixture(scope="module")
def scenarios(engines: PerTp, tp_params: PerTp) -> PerTp:
    return PerTp(lambda tp: run_scenario(engines[tp], tp_params[tp]))


# 1. Exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", TPS)
def test_greedy_tokens_are_identical_at_every_tp_and_the_reference(
    scenarios, engines, tp_params, tp: int
):
    steps = scenarios[tp][0]
    if tp == 1:  # TP=1 itself: the first slot's whole run is the uncached reference's
        expected = reference_greedy(engines[1], tp_params[1], PROMPTS[0], STEPS + 1)
        assert [steps[0][0]] + [live[0] for live in steps[1:]] == expected
    assert steps == scenarios[1][0]


@pytest.mark.parametrize("tp", TPS[1:])
def test_logits_match_tp1(scenarios, engines, tp_params, tp: int):
    for got, want in zip(scenarios[tp][1], scenarios[1][1], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    prompt = PROMPTS[3]
    full = engines[tp].reference_logits(tp_params[tp], prompt)
    want = engines[1].reference_logits(tp_params[1], prompt)
    np.testing.assert_allclose(full, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_sampled_tokens_are_identical_at_every_tp(engines, tp_params):
    """Seeded sampling over vocabulary-sharded logits draws the same tokens."""
    sampling = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=7)
    runs = {}
    for tp in (1, 4):
        engine, params = engines[tp], tp_params[tp]
        prefix = engine.prefill(params, PROMPTS[2], sampling=sampling)
        batch = DecodeBatch(engine)
        batch.insert([prefix], [3])
        tokens = [prefix.first_token]
        for _ in range(12):
            tokens.append(batch.step(params)[0][3])
        runs[tp] = tokens
    assert runs[4] == runs[1]


# 2. Every leaf is where the rules put it -----------------------------------------------------


def _bytes_per_device(array: jax.Array) -> dict[jax.Device, int]:
    held: dict[jax.Device, int] = {}
    for shard in array.addressable_shards:
        held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


def _expected_split(path: str, tp: int) -> int:
    """How many ways the rules split each param of `tiny` (8 heads, 2 KV heads)."""
    if path.endswith(("_norm.scale", "final_norm.scale")):
        return 1
    if re.search(r"\.(k_proj|v_proj)\.", path):
        return tp if 2 % tp == 0 else 1  # replicated once there are more devices than heads
    return tp  # q/o, MLP, embedding: split


@pytest.mark.parametrize("tp", (2, 4))
def test_params_are_split_or_replicated_as_the_rules_say(tp_params, tp: int):
    checked = 0
    for path, leaf in flatten(tp_params[tp]).items():
        held = _bytes_per_device(leaf)
        assert len(held) == tp, path
        split = _expected_split(path, tp)
        for nbytes in held.values():
            assert nbytes == leaf.nbytes // split, (path, nbytes, leaf.nbytes, split)
        checked += 1
    assert checked > 20


@pytest.mark.parametrize("tp", (2, 4, 8))
def test_kv_page_pool_is_split_by_heads(engines, tp: int):
    state = engines[tp].init_decode_state()
    cache_heads = Parallelism.of(engines[tp].model_config, tp).cache_heads
    for leaf in jax.tree.leaves(state.cache):
        assert leaf.shape[0] == cache_heads
        held = _bytes_per_device(leaf)
        assert len(held) == tp and set(held.values()) == {leaf.nbytes // tp}
    for leaf in (state.lengths, state.tokens, state.seeds, state.page_table):
        assert set(_bytes_per_device(leaf).values()) == {leaf.nbytes}  # replicated


def test_decode_step_updates_the_sharded_cache_in_place(engines, tp_params):
    """The donated cache is aliased to the output and never copied whole: no copy of a
    per-device cache shard in the compiled step (the reason for the head-major layout)."""
    engine = engines[4]
    state = engine.init_decode_state()
    rows, pages = np.arange(4, dtype=np.int32), np.full(4, -1, np.int32)
    with jax.set_mesh(engine.mesh):
        lowered = engine.decode.generate_jit.lower(
            tp_params[4], state, rows, pages, np.bool_(False)
        )
        compiled = lowered.compile()
    text = compiled.as_text()
    leaf = jax.tree.leaves(state.cache)[0]
    local = (leaf.shape[0] // 4, *leaf.shape[1:])
    shard_shape = f"f32[{','.join(map(str, local))}]"
    copies = [line for line in text.splitlines() if shard_shape in line and " copy(" in line]
    assert copies == []
    header = text.splitlines()[0]  # HloModule ..., input_output_alias={ {0}: (1, {}, ...) }
    aliases = len(re.findall(r"(?:may|must)-alias\)", header))
    assert aliases >= len(jax.tree.leaves(state))  # the whole donated state, cache included


# 4. Compiles ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", TPS[1:])
def test_compile_counts_equal_the_unsharded_engine(scenarios, engines, tp: int):
    """Sharding adds no compile: every program (one chunk program per rows bucket, one
    per decode batch bucket) compiled once at every TP. Which buckets exist depends on
    the tests that ran (a one-row step compiles generate[1])."""
    scenarios[tp], scenarios[1]
    for counts in (engines[tp].compile_counts, engines[1].compile_counts):
        assert set(counts.values()) == {1}, counts
    shared = engines[tp].compile_counts.keys() & engines[1].compile_counts.keys()
    assert {"generate[4]", "chunk[1x16]", "gather[1]", "insert[2x16]", "release"} <= shared


# 5. Checkpoints and int8 -----------------------------------------------------------------------


def _greedy(engine: Engine, params: Params, prompt: list[int], n: int) -> list[int]:
    prefix = engine.prefill(params, prompt)
    batch = DecodeBatch(engine)
    batch.insert([prefix], [0])
    tokens = [prefix.first_token]
    for _ in range(n - 1):
        tokens.append(batch.step(params)[0][0])
    return tokens


def test_orbax_saved_at_tp4_restores_at_tp2(engines, tp_params, tiny_config, tmp_path):
    mesh4, mesh2 = make_mesh(4), make_mesh(2)
    saved = load_model("tiny", engine_config=CONFIG, mesh=mesh4)
    save_checkpoint(tmp_path / "ckpt", saved.model_config, saved.params)
    restored = load_model(str(tmp_path / "ckpt"), engine_config=CONFIG, mesh=mesh2)
    for leaf in jax.tree.leaves(restored.params):
        assert len(leaf.sharding.device_set) == 2
    assert restored.weights_id == saved.weights_id
    expected = reference_greedy(engines[1], tp_params[1], PROMPTS[3], 12)
    assert _greedy(engines[2], restored.params, PROMPTS[3], 12) == expected


@pytest.mark.parametrize("quantize", ["int8", "int8-blocks"])
def test_int8_sharded_equals_int8_unsharded(tiny_config, quantize: str):
    """The int8 model served at TP=4 gives the int8 model's uncached reference at TP=1
    (the reference alone at TP=1: one program, not a whole serving path)."""
    tokens = {}
    for tp in (1, 4):
        mesh = make_mesh(tp)
        loaded = load_model("tiny", engine_config=CONFIG, quantize=quantize, mesh=mesh)
        engine = Engine(loaded.model_config, CONFIG, mesh)
        if tp == 1:
            tokens[tp] = reference_greedy(engine, loaded.params, PROMPTS[1], 8)
        else:
            tokens[tp] = _greedy(engine, loaded.params, PROMPTS[1], 8)
        kernel = loaded.params["layers"][0]["mlp"]["gate_proj"]["kernel"][...]
        assert kernel.dtype == np.int8 and len(kernel.sharding.device_set) == tp
        if quantize == "int8-blocks":
            # Row-parallel down_proj: its blocks split over the devices with the kernel rows.
            down = loaded.params["layers"][0]["mlp"]["down_proj"]
            rows = {s.data.shape[0] for s in down["kernel"][...].addressable_shards}
            block_rows = {s.data.shape[0] for s in down["kernel_scale"][...].addressable_shards}
            assert rows == {tiny_config.ffn_dim // tp}
            assert block_rows == {tiny_config.ffn_dim // tp // 32}
    assert tokens[4] == tokens[1]


# Refusals and capacity -------------------------------------------------------------------------


def test_unsupported_tensor_parallel_sizes_are_refused_with_the_valid_ones():
    smollm2_heads = dict(num_heads=9, num_kv_heads=3)
    assert valid_tensor_parallel(**smollm2_heads, limit=16) == [1, 3, 9]
    with pytest.raises(ConfigError, match=r"--tensor-parallel=2 does not fit .* 1, 3, 9"):
        Parallelism(2, **smollm2_heads)
    with pytest.raises(ConfigError, match="needs 16 devices; this host has 8"):
        make_mesh(16)
    replicated = Parallelism(8, 8, 2)
    assert (replicated.cache_heads, replicated.kv_replication) == (8, 4)
    assert replicated.rules()["kv_heads"] is None and Parallelism(2, 8, 2).rules()["kv_heads"]


def test_slots_auto_arithmetic_from_a_fake_memory_source(tiny_config):
    gib = 2**30
    per_token = kv_bytes_per_token(tiny_config, itemsize=2, cache_heads_per_device=1)
    assert per_token == 4 * 2 * 1 * 32 * 2  # layers x (K, V) x heads x head_dim x bf16
    stats = [{"bytes_limit": 16 * gib, "bytes_in_use": 0}, {"bytes_limit": 15 * gib}]
    memory = device_memory(stats, "tpu")
    assert memory == 15 * gib  # the tightest device decides
    plan = plan_capacity(
        device_bytes=memory,
        params_bytes=2 * gib,
        bytes_per_token=per_token,
        fraction=0.9,
        headroom_bytes=gib,
        slots=None,
        max_seq_len=4096,
        context_limit=8192,
        min_seq_len=128,
    )
    budget = int(0.9 * 15 * gib) - 2 * gib - gib
    assert plan.slots == budget // (4096 * per_token)
    assert plan.kv_bytes <= budget < plan.kv_bytes + 4096 * per_token
    assert "slots = " in plan.describe() and "headroom" in plan.describe()
    fitted = plan_capacity(
        device_bytes=memory,
        params_bytes=2 * gib,
        bytes_per_token=per_token,
        fraction=0.9,
        headroom_bytes=gib,
        slots=64,
        max_seq_len=None,
        context_limit=1024,
        min_seq_len=128,
    )
    assert fitted.max_seq_len == 1024  # capped at the model's context
    with pytest.raises(ConfigError, match="not even one slot"):
        plan_capacity(
            device_bytes=gib,
            params_bytes=0,
            bytes_per_token=2**20,
            fraction=1.0,
            headroom_bytes=0,
            slots=None,
            max_seq_len=4096,
            context_limit=8192,
            min_seq_len=128,
        )
    with pytest.raises(ConfigError, match=r"reports no memory statistics; give --slots N"):
        device_memory([jax.devices()[0].memory_stats()], "cpu")


# 3. Disaggregated across tensor-parallel sizes, over real gRPC processes ----------------------


@pytest.mark.timeout(240)
def test_prefill_and_decode_of_different_tp_sizes_serve_the_reference(
    process_cluster, engine, params
):
    """prefill TP=2 -> decode TP=4, and prefill TP=4 -> decode TP=1 (the session cluster's
    decode worker): the KV travels in the model's own heads and each receiver places it in
    its own layout. Each worker process gets 4 simulated devices."""
    import asyncio

    from tests.worker_harness import TRANSPORT, generate, spawn_worker, stop_worker

    started = []
    try:
        for role, tp in (("prefill", 2), ("decode", 4), ("prefill", 4)):
            started.append(spawn_worker(role, "--tensor-parallel", str(tp), devices=4))
        prefill2, decode4, prefill4 = started
        decode1 = process_cluster.workers.decode
        cases = [(prefill2, decode4, PROMPTS[3], 20), (prefill4, decode1, PROMPTS[2], 20)]

        async def body() -> None:
            from shared.transport.grpc_transport import GrpcDecodeClient, GrpcPrefillClient

            for prefill, decode, prompt, n in cases:
                prefill_client = GrpcPrefillClient(prefill.address, TRANSPORT)
                decode_client = GrpcDecodeClient(decode.address, TRANSPORT)
                try:
                    tokens, _ = await generate(
                        decode_client, prefill_client, decode.address, prompt, n
                    )
                finally:
                    await prefill_client.close()
                    await decode_client.close()
                assert tokens == reference_greedy(engine, params, prompt, n), (prefill, decode)

        asyncio.run(body())
        for worker, tp in zip(started, (2, 4, 4), strict=True):
            assert f"tensor parallel {tp}:" in "".join(worker.output)
    finally:
        for worker in started:
            stop_worker(worker)


@pytest.mark.parametrize("tp", [2, 4])
def test_chunked_prefill_with_prefix_hits_is_sharded_and_equals_tp1(engines, tp_params, tp):
    """The prefill worker's paged pool is split by heads like the decode pool; chunked
    prefill with prefix-cache hits (a whole page, and part of one copied into a page of
    its own) gives the TP1 logits and KV, packed two rows a call."""
    from shared.engine.chunked_prefill import ChunkedPrefill, ChunkRow
    from shared.kv.prefix_cache import PrefixPagePool
    from shared.kv.prefix_hash import namespace

    def serve(size: int) -> tuple[list[np.ndarray], list]:
        engine, params = engines[size], tp_params[size]
        device = ChunkedPrefill(engine, num_pages=40, chunk=8, max_rows=2)
        pool = PrefixPagePool(40, CONFIG.page_size, namespace("tp"), capacity_pages=16)
        logits, kvs = [], []
        first, second = PROMPTS[3], [*PROMPTS[3], 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
        third = [*PROMPTS[1], 99, 98, 97]  # PROMPTS[1]'s partial page lends its 8 tokens
        for tokens in ([first, PROMPTS[1]], [second, third]):  # the second call reuses
            lookups = [pool.acquire(t) for t in tokens]
            for lk in lookups:
                if lk.copy_from is not None:
                    device.copy_page(lk.copy_from, lk.pages[lk.hit_pages])
            done = [lk.hit_tokens for lk in lookups]
            while any(d < len(t) for d, t in zip(done, tokens, strict=True)):
                live = [i for i, t in enumerate(tokens) if done[i] < len(t)]
                rows = [
                    ChunkRow(
                        np.asarray(tokens[i][done[i] : done[i] + 8]),
                        done[i],
                        lookups[i].pages,
                        SamplingParams(),
                    )
                    for i in live
                ]
                out = device.run(params, rows, False)
                for j, i in enumerate(live):
                    done[i] += len(rows[j].tokens)
                    if done[i] == len(tokens[i]):
                        logits.append(np.asarray(out.logits[j]))
            for t, lk in zip(tokens, lookups, strict=True):
                kvs.append(jax.tree.map(np.asarray, device.gather(lk.pages, len(t))))
                pool.finish(t, lk)
        assert [(lk.hit_tokens, lk.copy_from is not None) for lk in lookups] == [
            (16, False),
            (8, True),
        ]
        leaf = jax.tree.leaves(device.pool)[0]
        held = _bytes_per_device(leaf)  # split by cache heads: each device its share
        assert len(held) == size and set(held.values()) == {leaf.nbytes // size}
        return logits, kvs

    ref_logits, ref_kv = serve(1)
    logits, kv = serve(tp)
    for a, b in zip(logits, ref_logits, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
        assert int(np.argmax(a)) == int(np.argmax(b))
    for a, b in zip(jax.tree.leaves(kv), jax.tree.leaves(ref_kv), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_chunked_prefill_updates_the_sharded_pool_in_place(engines, tp_params):
    """As the decode step: the donated prefill pool is aliased to the output and no shard
    of it is copied whole in the compiled chunk call."""
    from shared.engine.chunked_prefill import ChunkedPrefill

    engine = engines[4]
    device = ChunkedPrefill(engine, num_pages=40, chunk=8, max_rows=2)
    tokens = np.zeros((2, 8), np.int32)
    zeros = np.zeros((2,), np.int32)
    tables = np.zeros((2, CONFIG.max_pages_per_slot), np.int32)
    sampling = sampling_rows([SamplingParams()] * 2)
    with jax.set_mesh(engine.mesh):
        compiled = device.programs.chunk.lower(
            tp_params[4], device.pool, tokens, zeros, zeros, tables, *sampling, np.bool_(False)
        ).compile()
    text = compiled.as_text()
    leaf = jax.tree.leaves(device.pool)[0]
    local = (leaf.shape[0] // 4, *leaf.shape[1:])
    shard_shape = f"f32[{','.join(map(str, local))}]"
    assert [line for line in text.splitlines() if shard_shape in line and " copy(" in line] == []
    aliases = len(re.findall(r"(?:may|must)-alias\)", text.splitlines()[0]))
    assert aliases >= len(jax.tree.leaves(device.pool))
    # The page copy of a partial prefix hit too: one page moves, the pool stays in place.
    with jax.set_mesh(engine.mesh):
        copy_text = (
            device.programs.copy_page.lower(device.pool, np.int32(1), np.int32(2))
            .compile()
            .as_text()
        )
    assert [
        line for line in copy_text.splitlines() if shard_shape in line and " copy(" in line
    ] == []
    aliases = len(re.findall(r"(?:may|must)-alias\)", copy_text.splitlines()[0]))
    assert aliases >= len(jax.tree.leaves(device.pool))
