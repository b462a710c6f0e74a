"""Startup cuts (shared/serving/runtime.py): `--warm-up largest` serves once the largest
decode batch bucket is compiled and compiles the others while serving (held buckets step
up to the next larger one, with the same tokens); `--compilation-cache-dir` keeps compiled
programs for the next start, which then compiles nothing new."""

from __future__ import annotations

import pathlib
import threading

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
from tests.reference import reference_greedy
from tests.worker_harness import spawn_worker, stop_worker

PROMPT = [5, 6, 7]


@pytest.mark.timeout(90)  # compiles a few programs of a fresh engine
def test_held_batch_buckets_step_up_until_compiled_with_the_same_tokens(
    tiny_config: ModelConfig, engine_config: EngineConfig, engine: Engine, params: Params
):
    held = Engine(tiny_config, engine_config)
    with pytest.raises(EngineError, match="largest batch bucket cannot be held"):
        held.hold_buckets((4,))
    held.hold_buckets((1, 2))
    assert held.held_buckets == (1, 2)
    expected = reference_greedy(engine, params, PROMPT, 2)

    # Held: one decode row runs in batch bucket 4.
    prefix = held.prefill(params, PROMPT)
    assert prefix.first_token == expected[0]
    state = held.bulk_insert([prefix], held.init_decode_state(), [0], [[1]])
    state, tokens, _ = held.generate(params, state, [0])
    assert tokens.shape == (4,) and held.compile_counts["generate[1]"] == 0
    assert int(tokens[0]) == expected[1]

    # Compiled ahead (nothing run, nothing donated): the next step uses its own bucket and
    # traces nothing more.
    held.compile_generate(params, 1)
    assert held.held_buckets == (2,)
    assert held.compile_counts["generate[1]"] == 1
    state = held.bulk_insert([prefix], held.release(state, 0), [0], [[1]])
    state, tokens, _ = held.generate(params, state, [0])
    assert tokens.shape == (1,) and int(tokens[0]) == expected[1]
    assert held.compile_counts["generate[1]"] == 1


@pytest.mark.timeout(90)
def test_warm_up_largest_then_the_rest_in_the_background(
    tiny_config: ModelConfig, engine_config: EngineConfig, params: Params
):
    runtime = ModelRuntime(Engine(tiny_config, engine_config), params, "tiny", None)
    engine = runtime.engine
    seconds = warm_up(runtime, hold=True)
    assert set(seconds) == {"inserts", "generate[4]", "total"}
    assert engine.held_buckets == (1, 2)
    assert engine.compile_counts["generate[4]"] == 1 and engine.compile_counts["release"] == 1
    done: list[dict[str, float]] = []
    thread = compile_held_buckets(runtime, done.append)
    assert thread is not None
    thread.join(60)
    assert not thread.is_alive()
    assert engine.held_buckets == ()
    assert set(done[0]) == {"generate[1]", "generate[2]", "total"}
    for name in ("generate[1]", "generate[2]", "generate[4]"):
        assert engine.compile_counts[name] == 1, name
    assert compile_held_buckets(runtime) is None  # nothing left to compile


@pytest.mark.timeout(90)
def test_background_compiles_stop_starting_once_asked(
    tiny_config: ModelConfig, engine_config: EngineConfig, params: Params
):
    """A draining worker sets `stop` and joins the thread (run_worker): no bucket starts
    after that, so the process never tears down under a running XLA compile."""
    runtime = ModelRuntime(Engine(tiny_config, engine_config), params, "tiny", None)
    warm_up(runtime, hold=True)
    stop = threading.Event()
    stop.set()
    thread = compile_held_buckets(runtime, stop=stop)
    assert thread is not None
    thread.join(60)
    assert not thread.is_alive()
    assert runtime.engine.held_buckets == (1, 2)  # untouched
    assert runtime.engine.compile_counts["generate[1]"] == 0


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


def _cache_entries(directory: pathlib.Path) -> set[str]:
    return {str(f.relative_to(directory)) for f in directory.rglob("*") if f.is_file()}


@pytest.mark.timeout(180)  # starts two worker processes, one after the other
def test_a_second_start_compiles_nothing_new_from_the_cache_dir(tmp_path: pathlib.Path):
    """The colocated worker warms up both halves (the decode programs, every chunk shape of
    its prefill loop) into its cache dir; a second start from the same dir finds every
    program there and writes no entry of its own (the tests lower JAX's minimum compile
    time to 0 s, tests/conftest.py, so every compile would be stored)."""
    cache = tmp_path / "jax-cache"
    flags = ("--compilation-cache-dir", str(cache), "--warm-up", "all")
    first = spawn_worker("colocated", *flags)
    stop_worker(first)
    output = "".join(first.output)
    assert "compilation cache: " in output
    assert "compiled generate[" in output and "compiled chunked prefill" in output
    stored = _cache_entries(cache)
    # At least the decode step of each batch bucket and one chunk program.
    assert len(stored) > output.count("compiled generate[")
    second = spawn_worker("colocated", *flags)
    stop_worker(second)
    assert "compiled generate[" in "".join(second.output)
    assert _cache_entries(cache) == stored
