"""Fuzzing the public `GenerateRequest` (hypothesis) against the session's process cluster:
every field random (huge and negative numbers, NaN and infinities, long and empty strings,
huge stop lists, each prompt form (text, tokens, chat messages) or none) and, separately,
request bytes carrying invalid UTF-8 in `text` or `stop`. Each call must end with
INVALID_ARGUMENT or be a correct stream; afterwards the cluster still serves and every
decode slot is free. `tiny` has no chat template, so there a chat is always refused; a
second orchestrator process, serving the same workers with a checkpoint directory that
carries a chat template, takes fuzzed chats (roles the template refuses, empty and huge
contents, too many messages) to the end: the template's own errors and prompts too long
for the workers are INVALID_ARGUMENT, and the rest stream, their prompt the rendered chat.

A correct stream: responses echo the request id; only the last one has a finish reason and
it carries no tokens; the usage counts what was streamed; every token is in the
vocabulary; no stop token (nor EOS, unless ignored) is streamed; the text holds no stop
string; no more tokens than asked for.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Iterator, Sequence

import grpc
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from shared.chat import ChatError, ChatMessage, render_chat
from shared.config import ModelConfig
from shared.rpc.pdserve.v1 import generate_pb2, sampling_pb2
from shared.tokenizer import ByteTokenizer, ChatFormat
from shared.weights.checkpoint_files import FORMAT_VERSION, METADATA_FILE
from shared.weights.model_info import CHAT_TEMPLATE_FILE
from tests.cluster_harness import spawn_orchestrator
from tests.fuzzing import fuzz_settings
from tests.worker_harness import WorkerProcess, stop_worker

pytestmark = pytest.mark.fuzz

GENERATE = "/pdserve.v1.Generator/Generate"
VOCAB, EOS = 320, ByteTokenizer(320).eos_id
INT32 = st.integers(-(2**31), 2**31 - 1)
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)


# A short chat template in the shape of real ones: a role check that raises, one line per
# message, the assistant's turn opened. Short, so that a chat of a few short messages fits
# the test workers' 64 positions.
TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('unknown role ' + m.role) }}{% endif %}"
    "{{ m.role[0] }}:{{ m.content }}\n"
    "{% endfor %}{% if add_generation_prompt %}a:{% endif %}"
)
PROMPT_FORMS = ("text",) * 3 + ("tokens",) * 5 + ("chat",) * 2 + ("none",)


def mostly(valid: st.SearchStrategy, hostile: st.SearchStrategy) -> st.SearchStrategy:
    """The hostile value one time in eight: about half the examples then reach a stream,
    and the rest have a field or two out of range."""
    return st.integers(0, 7).flatmap(lambda i: hostile if i == 0 else valid)


def chat_messages() -> st.SearchStrategy:
    """1-3 short turns with the roles templates know; or hostile: no turns, hundreds, a
    role the template refuses or an empty one, contents of any size and alphabet."""
    role = mostly(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=12))
    content = mostly(st.text(max_size=6), st.text(max_size=3000))
    message = st.builds(generate_pb2.ChatMessage, role=role, content=content)
    return mostly(st.lists(message, min_size=1, max_size=3), st.lists(message, max_size=300))


@st.composite
def requests(
    draw: st.DrawFn, prompt_forms: Sequence[str] = PROMPT_FORMS
) -> generate_pb2.GenerateRequest:
    token = st.integers(0, VOCAB - 1)
    request = generate_pb2.GenerateRequest(
        request_id=draw(mostly(st.text(max_size=12), st.text(min_size=100, max_size=300))),
        max_tokens=draw(mostly(st.integers(1, 12), INT32)),
        stop=draw(
            mostly(
                st.lists(st.text(min_size=1, max_size=3), max_size=3),
                st.lists(st.text(max_size=400), max_size=60),
            )
        ),
        stop_token_ids=draw(mostly(st.lists(token, max_size=3), st.lists(INT32, max_size=300))),
        ignore_eos=draw(st.booleans()),
        timeout_seconds=draw(mostly(st.sampled_from([0.0, 10.0]), ANY_FLOAT)),
    )
    prompt = draw(st.sampled_from(prompt_forms))
    if prompt == "text":
        request.text = draw(mostly(st.text(min_size=1, max_size=20), st.text(max_size=3000)))
    elif prompt == "tokens":
        ids = mostly(st.lists(token, min_size=1, max_size=20), st.lists(INT32, max_size=200))
        request.tokens.ids.extend(draw(ids))
    elif prompt == "chat":
        request.chat.messages.extend(draw(chat_messages()))
        if not request.chat.messages:
            request.chat.SetInParent()  # the chat form, with no turns: still the chat form
    if draw(st.booleans()):
        request.sampling.CopyFrom(
            sampling_pb2.SamplingParams(
                temperature=draw(mostly(st.floats(0, 2), ANY_FLOAT)),
                top_k=draw(mostly(st.integers(0, 50), INT32)),
                top_p=draw(mostly(st.floats(0.01, 1), ANY_FLOAT)),
                seed=draw(st.integers(0, 2**64 - 1)),
            )
        )
    if draw(st.booleans()):  # logprobs; hostile: out of range, or alternatives without them
        request.logprobs = draw(mostly(st.just(True), st.booleans()))
        request.top_logprobs = draw(mostly(st.integers(0, 20), INT32))
    return request


def _field(number: int, data: bytes) -> bytes:
    """One length-delimited protobuf field (varint key, varint length)."""
    out, length = bytearray([number << 3 | 2]), len(data)
    while True:
        out.append((length & 0x7F) | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            return bytes(out) + data


@st.composite
def invalid_utf8(draw: st.DrawFn) -> bytes:
    """A request whose `text` (2) or a `stop` (6) holds bytes that are not UTF-8."""
    base = draw(requests()).SerializeToString()
    junk = draw(st.binary(min_size=1, max_size=64).filter(_not_utf8))
    return base + _field(draw(st.sampled_from([2, 6])), junk)


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def check_stream(
    request: generate_pb2.GenerateRequest, responses: list, chat: ChatFormat | None = None
) -> None:
    assert responses, "a stream ends with a finish response"
    *body, last = responses
    assert last.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED
    assert not last.token_ids
    assert all(r.finish_reason == generate_pb2.FINISH_REASON_UNSPECIFIED for r in body)
    ids = {r.request_id for r in responses}
    assert len(ids) == 1 and (ids == {request.request_id} or not request.request_id)
    tokens = [t for r in body for t in r.token_ids]
    assert last.usage.completion_tokens == len(tokens)
    if request.max_tokens:
        assert len(tokens) <= request.max_tokens
    assert all(0 <= t < VOCAB for t in tokens)
    assert not set(tokens) & set(request.stop_token_ids)
    if not request.ignore_eos:
        assert EOS not in tokens
    text = "".join(r.text for r in responses)
    assert not any(s and s in text for s in request.stop)
    if request.WhichOneof("prompt") == "tokens":
        assert last.usage.prompt_tokens == len(request.tokens.ids)
    if request.WhichOneof("prompt") == "chat":
        # The prompt is the rendered chat, one byte a token (no BOS: the template decides).
        assert chat is not None, "a chat streamed from a model without a template"
        messages = [ChatMessage(m.role, m.content) for m in request.chat.messages]
        assert last.usage.prompt_tokens == len(render_chat(chat, messages).encode())
    for response in responses:  # logprobs: one per token when asked for, none otherwise
        assert len(response.logprobs) == (len(response.token_ids) if request.logprobs else 0)
        for logprob in response.logprobs:
            top = [t.logprob for t in logprob.top]
            assert logprob.logprob <= 0 and len(top) == request.top_logprobs
            assert top == sorted(top, reverse=True)
            assert all(0 <= t.token_id < VOCAB for t in logprob.top)


def outcome(name: str) -> None:
    """Counted by hypothesis (shown with -s in a --fuzz-examples run): what the examples
    reached, so that a fuzzer that only ever meets the first check shows itself."""
    event(name)
    if os.environ.get("PDSERVE_FUZZ_OUTCOMES"):
        print("fuzz outcome:", name)


def _call(channel: grpc.Channel, data: bytes) -> tuple[list, grpc.RpcError | None]:
    responses = []
    try:
        for raw in channel.unary_stream(GENERATE)(data, timeout=30):
            responses.append(generate_pb2.GenerateResponse.FromString(raw))
    except grpc.RpcError as err:
        return responses, err
    return responses, None


def test_fuzzed_requests_get_invalid_argument_or_a_correct_stream(process_cluster) -> None:
    target = process_cluster.orchestrator.address
    with grpc.insecure_channel(target) as channel:

        @fuzz_settings(120)
        @given(requests())
        def well_typed(request: generate_pb2.GenerateRequest) -> None:
            responses, err = _call(channel, request.SerializeToString())
            if err is not None:
                assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, (err, request)
                assert err.details()
                outcome(f"INVALID_ARGUMENT {err.details().split()[0]}")
                return
            check_stream(request, responses)
            outcome(f"stream {generate_pb2.FinishReason.Name(responses[-1].finish_reason)}")

        @fuzz_settings(30)
        @given(invalid_utf8())
        def not_utf8(data: bytes) -> None:
            responses, err = _call(channel, data)
            assert err is not None and err.code() is grpc.StatusCode.INVALID_ARGUMENT, err
            assert "not a valid GenerateRequest" in err.details() and not responses

        well_typed()
        not_utf8()
        # Still serving, and nothing held.
        responses, err = _call(
            channel,
            generate_pb2.GenerateRequest(
                text="still there?", max_tokens=3, ignore_eos=True
            ).SerializeToString(),
        )
        assert err is None and responses[-1].usage.completion_tokens == 3
    assert asyncio.run(_all_free(process_cluster))


async def _all_free(cluster, timeout: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await cluster.all_free():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.05)
    return True


def test_nan_and_infinite_numbers_are_named_in_the_error(process_cluster) -> None:
    """Spot checks of what the fuzzer covers at random: the message names the field."""
    cases = {
        "timeout_seconds=nan": generate_pb2.GenerateRequest(text="a", timeout_seconds=math.nan),
        "temperature=nan": generate_pb2.GenerateRequest(
            text="a", sampling=sampling_pb2.SamplingParams(temperature=math.nan)
        ),
        "max_tokens=-5": generate_pb2.GenerateRequest(text="a", max_tokens=-5),
    }
    with grpc.insecure_channel(process_cluster.orchestrator.address) as channel:
        for needle, request in cases.items():
            _, err = _call(channel, request.SerializeToString())
            assert err is not None and err.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert needle in err.details(), err.details()


@pytest.fixture(scope="module")
def chat_orchestrator(process_cluster, tmp_path_factory) -> Iterator[WorkerProcess]:
    """An orchestrator process for the session's workers whose --model is a checkpoint
    directory of `tiny` (metadata only: the orchestrator loads no weights) with TEMPLATE
    as its chat template."""
    model = tmp_path_factory.mktemp("tiny-chat")
    meta = {"format_version": FORMAT_VERSION, "model_config": ModelConfig.tiny().to_dict()}
    (model / METADATA_FILE).write_text(json.dumps(meta))
    (model / CHAT_TEMPLATE_FILE).write_text(TEMPLATE)
    workers = process_cluster.workers
    orchestrator = spawn_orchestrator(
        "--model",
        str(model),
        "--prefill",
        workers.prefill.address,
        "--decode",
        workers.decode_address,
    )
    yield orchestrator
    stop_worker(orchestrator)


@pytest.mark.timeout(240)  # may start the session's process cluster; 80 examples
def test_fuzzed_chats_get_invalid_argument_or_the_rendered_prompts_stream(
    process_cluster, chat_orchestrator
) -> None:
    tiny = ModelConfig.tiny()
    chat = ChatFormat(TEMPLATE, end_of_turn_ids=(tiny.eos_id,))
    reached: set[str] = set()
    with grpc.insecure_channel(chat_orchestrator.address) as channel:

        @fuzz_settings(80)
        @given(requests(prompt_forms=("chat",)))
        def chats(request: generate_pb2.GenerateRequest) -> None:
            responses, err = _call(channel, request.SerializeToString())
            messages = [ChatMessage(m.role, m.content) for m in request.chat.messages]
            try:
                render_chat(chat, messages)
            except ChatError:
                # What the template (or the message checks before it) refuses is refused;
                # the message names the chat unless another field was refused first.
                assert err is not None and err.code() is grpc.StatusCode.INVALID_ARGUMENT
                if err.details().startswith("chat:"):
                    reached.add("refused by the template")
                return
            if err is not None:
                assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, (err, request)
                reached.add("INVALID_ARGUMENT")
                outcome(f"chat INVALID_ARGUMENT {err.details().split()[0]}")
                return
            check_stream(request, responses, chat)
            reached.add("stream")
            outcome(f"chat stream {generate_pb2.FinishReason.Name(responses[-1].finish_reason)}")

        chats()
    # The fuzzer reached every outcome, so none of the checks above is vacuous.
    assert reached == {"refused by the template", "INVALID_ARGUMENT", "stream"}, reached
    assert asyncio.run(_all_free(process_cluster))
