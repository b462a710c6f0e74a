"""Chat from the command line, answered: `pdserve generate --chat` / `--messages` against a
cluster of processes serving a templated model over gRPC, and `pdserve generate-local
--chat` in process.

The model is tiny's weights (seed 0) in a GGUF with a byte-level BPE tokenizer and a ChatML
template (tests/gguf_support.py), so the expected answer is independent of the chat code:
the template rendered by hand, tokenized, and decoded greedily by the engine's uncached
reference. The GGUF's end-of-turn token (`tokenizer.ggml.eot_token_id`) is chosen from
that greedy answer, so the chat's end of turn must cut it (finish "stop") at a known place.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib

import gguf
import numpy as np
import pytest

import pdserve_cli
from decode_server import local_generate
from shared.engine.engine import Engine, Params
from shared.weights.checkpoint import load_model
from shared.weights.model_info import load_model_info
from shared.weights.tree import flatten
from tests.cluster_harness import spawn_orchestrator
from tests.gguf_support import IM_END, IM_START, params_as_gguf_tensors, tiny_tokenizer, write_gguf
from tests.reference import reference_greedy
from tests.worker_harness import spawn_worker, stop_worker

MAX_TOKENS = 12
# ChatML as the template in tiny_tokenizer() renders it (add_generation_prompt=True).
HI = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
MESSAGES = [{"role": "system", "content": "Be"}, {"role": "user", "content": "the"}]
MESSAGES_TEXT = (
    "<|im_start|>system\nBe<|im_end|>\n<|im_start|>user\nthe<|im_end|>\n<|im_start|>assistant\n"
)


@dataclasses.dataclass(frozen=True)
class Expected:
    prompt_ids: list[int]
    tokens: list[int]  # the answer, without the token that ended it
    finish: str


@dataclasses.dataclass(frozen=True)
class ChatModel:
    path: pathlib.Path
    hi: Expected  # `--chat Hi`
    messages: Expected  # `--messages` MESSAGES


def expected_answer(
    engine: Engine, params: Params, prompt_ids: list[int], ends: set[int]
) -> Expected:
    full = reference_greedy(engine, params, prompt_ids, MAX_TOKENS)
    for i, token in enumerate(full):
        if token in ends:
            return Expected(prompt_ids, full[:i], "stop")
    return Expected(prompt_ids, full, "length")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, engine: Engine, params: Params) -> ChatModel:
    """The templated GGUF, and the answers a correct chat path gives with it."""
    loaded = load_model("tiny", engine_config=engine.config, seed=0)
    flat = {k: np.asarray(v) for k, v in flatten(loaded.params).items()}
    config = dataclasses.replace(loaded.model_config, bos_id=IM_START, eos_id=IM_END)
    tensors = params_as_gguf_tensors(config, flat)
    folder = tmp_path_factory.mktemp("chat")
    # First without an end-of-turn id: only to tokenize the prompts with the file's BPE.
    plain = write_gguf(folder / "plain.gguf", config, tensors, tokenizer=tiny_tokenizer())
    tokenizer = load_model_info(str(plain)).tokenizer
    hi_ids = tokenizer.encode(HI, add_bos=False)
    messages_ids = tokenizer.encode(MESSAGES_TEXT, add_bos=False)
    # The template's control tokens are single ids (not spelled out in bytes).
    assert hi_ids.count(IM_START) == 2 and hi_ids.count(IM_END) == 1, hi_ids
    full = reference_greedy(engine, params, hi_ids, MAX_TOKENS)
    # End of turn: the first token of the answer, from the 4th on, not seen before it (so
    # the cut lands exactly there); IM_END (the EOS) must not come earlier.
    cut = next(i for i in range(3, MAX_TOKENS) if full[i] not in full[:i])
    end_of_turn = full[cut]
    assert IM_END not in full[:cut], full
    metadata = {
        **tiny_tokenizer(),
        "tokenizer.ggml.eot_token_id": (end_of_turn, gguf.GGUFValueType.UINT32),
    }
    path = write_gguf(folder / "chat.gguf", config, tensors, tokenizer=metadata)
    ends = {end_of_turn, IM_END}
    assert load_model_info(str(path)).chat.end_of_turn_ids == tuple(sorted(ends))
    hi = Expected(hi_ids, full[:cut], "stop")
    assert hi == expected_answer(engine, params, hi_ids, ends)
    return ChatModel(path, hi, expected_answer(engine, params, messages_ids, ends))


def json_rows(text: str) -> tuple[list[int], dict]:
    """`--json` output -> (the token ids, the final line)."""
    rows = [json.loads(line) for line in text.splitlines()]
    return [r["token_id"] for r in rows[:-1]], rows[-1]


def assert_answer(text: str, expected: Expected) -> None:
    tokens, last = json_rows(text)
    assert tokens == expected.tokens
    assert last["finish_reason"] == expected.finish
    assert last["usage"] == {
        "prompt_tokens": len(expected.prompt_ids),
        "completion_tokens": len(expected.tokens),
    }


@pytest.mark.timeout(60)  # compiles generate-local's own engine
def test_generate_local_chat_answers_through_the_template(chat_model: ChatModel):
    out = io.StringIO()
    argv = [
        "--tensor-parallel",
        "1",
        "--model",
        str(chat_model.path),
        "--chat",
        "Hi",
        "--json",
        "--max-tokens",
        str(MAX_TOKENS),
        "--max-seq-len",
        "64",
    ]
    assert local_generate.run(local_generate.build_parser().parse_args(argv), out=out) == 0
    assert_answer(out.getvalue(), chat_model.hi)


@pytest.mark.timeout(180)  # starts three processes of its own
def test_generate_chat_and_messages_over_grpc(chat_model: ChatModel, tmp_path, capsys):
    model = ["--model", str(chat_model.path)]
    started = []
    try:
        started += [spawn_worker("prefill", *model), spawn_worker("decode", *model)]
        prefill, decode = started
        flags = ["--prefill", prefill.address, "--decode", decode.address]
        started.append(spawn_orchestrator(*model, *flags))
        target = ["--target", started[2].address, "--json", "--max-tokens", str(MAX_TOKENS)]
        assert pdserve_cli.main(["generate", *target, "--chat", "Hi"]) == 0
        assert_answer(capsys.readouterr().out, chat_model.hi)
        messages = tmp_path / "messages.json"
        messages.write_text(json.dumps(MESSAGES))
        assert pdserve_cli.main(["generate", *target, "--messages", str(messages)]) == 0
        assert_answer(capsys.readouterr().out, chat_model.messages)
    finally:
        for process in reversed(started):
            stop_worker(process)
