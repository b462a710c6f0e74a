"""Startup cuts (shared/serving/runtime.py): `--warm-up largest` serves once the largest
buckets are compiled and compiles the others while serving (held buckets step up to the
next larger one, with the same tokens); `--compilation-cache-dir` keeps compiled programs
for the next start."""

from __future__ import annotations

import pathlib
import threading

import jax
import pytest

from shared.cluster import local_cluster
from shared.config import ConfigError, EngineConfig, ModelConfig, Quantization
from shared.engine.engine import Engine, EngineError, Params
from shared.serving.runtime import (
    ModelRuntime,
    compile_held_buckets,
    enable_compilation_cache,
    warm_up,
)
from shared.serving.worker_config import COMPILATION_CACHE_ENV, Role, parse_worker_args
from tests.worker_harness import spawn_worker, stop_worker

PROMPT = [5, 6, 7]  # bucket 8 of the test engine (buckets 8, 16, 32)


def prefix_length(prefix) -> int:
    return jax.tree.leaves(prefix.cache)[0].shape[1]


@pytest.mark.timeout(90)  # compiles a few programs of a fresh engine
def test_held_buckets_step_up_until_compiled_with_the_same_tokens(
    tiny_config: ModelConfig, engine_config: EngineConfig, engine: Engine, params: Params
):
    held = Engine(tiny_config, engine_config)
    with pytest.raises(EngineError, match="largest prefill and batch buckets cannot be held"):
        held.hold_buckets(prefill=(32,))
    with pytest.raises(EngineError, match="largest"):
        held.hold_buckets(batch=(4,))
    held.hold_buckets(prefill=(8, 16), batch=(1, 2))
    assert held.held_buckets == {"prefill": (8, 16), "generate": (1, 2)}
    expected = engine.prefill(params, PROMPT)  # the session engine: bucket 8

    # Held: the 3-token prompt runs in bucket 32, one decode row in batch bucket 4.
    prefix = held.prefill(params, PROMPT)
    assert prefix_length(prefix) == 32 and held.compile_counts["prefill[8]"] == 0
    assert prefix.first_token == expected.first_token
    state = held.bulk_insert([prefix], held.init_decode_state(), [0], [[1]])
    state, tokens, _ = held.generate(params, state, [0])
    assert tokens.shape == (4,) and held.compile_counts["generate[1]"] == 0
    step = int(tokens[0])

    # Compiled ahead (nothing run, nothing donated): the next calls use their own buckets
    # and trace nothing more.
    held.compile_prefill(params, 8)
    held.compile_generate(params, 1)
    assert held.held_buckets == {"prefill": (16,), "generate": (2,)}
    assert held.compile_counts["prefill[8]"] == 1 and held.compile_counts["generate[1]"] == 1
    prefix = held.prefill(params, PROMPT)
    assert prefix_length(prefix) == 8 and prefix.first_token == expected.first_token
    state = held.bulk_insert([prefix], held.release(state, 0), [0], [[1]])
    state, tokens, _ = held.generate(params, state, [0])
    assert tokens.shape == (1,) and int(tokens[0]) == step
    assert held.compile_counts["prefill[8]"] == 1 and held.compile_counts["generate[1]"] == 1


@pytest.mark.timeout(90)
def test_warm_up_largest_then_the_rest_in_the_background(
    tiny_config: ModelConfig, engine_config: EngineConfig, params: Params
):
    runtime = ModelRuntime(Engine(tiny_config, engine_config), params, "tiny", None)
    engine = runtime.engine
    seconds = warm_up(runtime, prefill=True, decode=True, hold=True)
    assert set(seconds) == {"prefill[32]", "inserts", "generate[4]", "total"}
    assert engine.held_buckets == {"prefill": (8, 16), "generate": (1, 2)}
    done: list[dict[str, float]] = []
    thread = compile_held_buckets(runtime, done.append)
    assert thread is not None
    thread.join(60)
    assert not thread.is_alive()
    assert engine.held_buckets == {"prefill": (), "generate": ()}
    assert set(done[0]) == {"prefill[8]", "prefill[16]", "generate[1]", "generate[2]", "total"}
    for name in (
        "prefill[8]",
        "prefill[16]",
        "prefill[32]",
        "generate[1]",
        "generate[2]",
        "generate[4]",
    ):
        assert engine.compile_counts[name] == 1, name
    assert compile_held_buckets(runtime) is None  # nothing left to compile


@pytest.mark.timeout(90)
def test_background_compiles_stop_starting_once_asked(
    tiny_config: ModelConfig, engine_config: EngineConfig, params: Params
):
    """A draining worker sets `stop` and joins the thread (run_worker): no bucket starts
    after that, so the process never tears down under a running XLA compile."""
    runtime = ModelRuntime(Engine(tiny_config, engine_config), params, "tiny", None)
    warm_up(runtime, prefill=True, decode=True, hold=True)
    stop = threading.Event()
    stop.set()
    thread = compile_held_buckets(runtime, stop=stop)
    assert thread is not None
    thread.join(60)
    assert not thread.is_alive()
    assert runtime.engine.held_buckets == {"prefill": (8, 16), "generate": (1, 2)}  # untouched


def test_compilation_cache_flags(monkeypatch, tmp_path: pathlib.Path):
    base = ["--model", "tiny"]
    monkeypatch.delenv(COMPILATION_CACHE_ENV, raising=False)
    assert parse_worker_args(base, Role.PREFILL).compilation_cache_dir is None  # workers: off
    assert parse_worker_args(base, Role.PREFILL).warm_up == "largest"
    monkeypatch.setenv(COMPILATION_CACHE_ENV, str(tmp_path / "env"))
    assert parse_worker_args(base, Role.DECODE).compilation_cache_dir == tmp_path / "env"
    flag = [*base, "--compilation-cache-dir", str(tmp_path / "flag")]
    assert parse_worker_args(flag, Role.DECODE).compilation_cache_dir == tmp_path / "flag"
    off = [*base, "--compilation-cache-dir", ""]
    assert parse_worker_args(off, Role.DECODE).compilation_cache_dir is None
    # `pdserve serve`: on by default, in the user's cache directory (or JAX's own variable).
    monkeypatch.delenv(COMPILATION_CACHE_ENV)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    args = local_cluster.build_parser().parse_args([])
    assert args.compilation_cache_dir == str(tmp_path / "xdg" / "pdserve" / "jax")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert local_cluster.build_parser().parse_args([]).compilation_cache_dir == str(
        tmp_path / "jax"
    )
    # A directory that cannot be made is a flag error, before JAX is touched.
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=r"--compilation-cache-dir .*a-file/cache"):
        enable_compilation_cache(tmp_path / "a-file" / "cache")


def test_serve_passes_its_model_and_quantization_to_every_worker():
    flags = ["--model", "smollm2", "--quantize", "int8-blocks", "--float-lm-head"]
    flags += ["--slots", "3", "--max-seq-len", "192", "--page-size", "8"]
    args = local_cluster.build_parser().parse_args(flags)
    for role in Role:
        engine = local_cluster.worker_engine_args(args, role.value)
        config = parse_worker_args(engine, role)  # the worker's own parser takes them all
        assert config.model == "smollm2" and (config.max_seq_len, config.page_size) == (192, 8)
        assert config.quantization == Quantization(block_size=32, embedding=False, lm_head=False)
        # Slots only to the roles that hold them (a prefill worker's parser refuses --slots).
        assert ("--slots" in engine) == (role is not Role.PREFILL)
        assert role is Role.PREFILL or config.slots == 3
    plain = local_cluster.build_parser().parse_args([])
    engine = local_cluster.worker_engine_args(plain, "decode")
    assert parse_worker_args(engine, Role.DECODE).quantization is None


@pytest.mark.timeout(120)  # starts a worker process
def test_a_worker_keeps_what_it_compiled_in_its_cache_dir(tmp_path: pathlib.Path):
    cache = tmp_path / "jax-cache"
    worker = spawn_worker("prefill", "--compilation-cache-dir", str(cache), "--warm-up", "all")
    try:
        assert any("compilation cache: " in line for line in worker.output)
        # Every prefill bucket was compiled before serving, each into the cache (the tests
        # lower JAX's minimum compile time to 0 s: tests/conftest.py).
        assert len([f for f in cache.rglob("*") if f.is_file()]) >= 3
    finally:
        stop_worker(worker)
