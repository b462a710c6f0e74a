"""The OpenAI-compatible HTTP API over a real loopback server, called with the official
`openai` client (and raw HTTP where the client hides what is tested): an orchestrator
process with `--http-port 0` in front of tiny workers of its own (tests/openai_support.py).
Busy, draining and slow servers and clients that go away: tests/test_openai_statuses.py."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

import pdserve_cli
from shared.client.generator import GeneratorClient
from shared.cluster.processes import Child
from tests.openai_support import (
    CHAT_RENDERED,
    MAX_SEQ_LEN,
    MODEL,
    TOKEN,
    OpenAiCluster,
    error_of,
    grpc_text,
    post,
)
from tests.reference import scrape

pytestmark = pytest.mark.timeout(360)  # the first test may start the cluster
SAMPLING = dict(temperature=0.8, top_p=0.9, seed=7)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


@pytest.fixture
def server(openai_cluster: OpenAiCluster) -> tuple[Child, str]:
    """(orchestrator process, base URL) of the session's OpenAI-API cluster."""
    return openai_cluster.orchestrator, openai_cluster.base


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=TOKEN, max_retries=0, timeout=60)


# Same tokens as gRPC, streaming and not ----------------------------------------------


def test_streamed_completion_equals_grpc_for_the_same_seed(server, client):
    stream = client.completions.create(
        model=MODEL,
        prompt="Hello, pdserve",
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        **SAMPLING,
    )
    chunks = list(stream)
    text, tokens, finish = grpc_text(server, "Hello, pdserve", max_tokens=12, **SAMPLING)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == finish and set(finishes[:-1]) <= {None}
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.prompt_tokens == len("Hello, pdserve") + 1  # bytes + BOS
    assert usage.completion_tokens == len(tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_chat_equals_grpc_for_the_same_seed(server, client):
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=12, stream=True, **SAMPLING
    )
    chunks = list(stream)
    text, tokens, finish = grpc_text(server, MESSAGES, max_tokens=12, **SAMPLING)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish
    assert len(tokens) >= 1


def test_non_streamed_responses_carry_the_same_text_and_usage(server, client):
    ids = [256, 72, 105, 33]
    text, tokens, finish = grpc_text(server, ids, max_tokens=8, temperature=0.0)
    response = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert response.choices[0].text == text and response.choices[0].finish_reason == finish
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (4, len(tokens))
    assert response.model == MODEL and response.object == "text_completion"
    text, tokens, finish = grpc_text(server, MESSAGES, max_tokens=8, temperature=0.0)
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.content == text and chat.choices[0].finish_reason == finish
    rendered = len(CHAT_RENDERED)  # bytes; a chat prompt gets no BOS (the template's job)
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (rendered, len(tokens))


# n ------------------------------------------------------------------------------------------


def test_n_with_a_seed_gives_reproducible_different_completions(client):
    def run() -> list[str]:
        response = client.completions.create(
            model=MODEL, prompt="Once", max_tokens=10, n=3, seed=11, temperature=1.0
        )
        assert [c.index for c in response.choices] == [0, 1, 2]
        return [c.text for c in response.choices]

    first = run()
    assert run() == first
    assert len(set(first)) == 3, first


# Bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "status", "param", "message"),
    [
        (dict(model="nope", prompt="x"), 404, "model", "model 'nope' does not exist"),
        (dict(model=MODEL, prompt="x", temperature=-1), 400, "temperature", "greater than"),
        (
            dict(model=MODEL, prompt="x", presence_penalty=0.5),
            400,
            "presence_penalty",
            "unsupported parameter(s): presence_penalty",
        ),
        (
            dict(model=MODEL, prompt="x" * MAX_SEQ_LEN),
            400,
            None,
            f"exceeds this worker's max_seq_len ({MAX_SEQ_LEN})",
        ),
        (dict(model=MODEL, prompt="x", max_tokens=10**6), 400, None, "max_tokens=1000000"),
    ],
)
def test_bad_completion_requests_get_openai_errors(client, kwargs, status, param, message):
    code, body = error_of(lambda: client.completions.create(**kwargs))
    assert code == status
    assert set(body) >= {"message", "type", "param", "code"}
    assert body["param"] == param and message in body["message"], body


def test_bad_chat_requests_get_openai_errors_and_the_server_keeps_serving(client):
    code, body = error_of(lambda: client.chat.completions.create(model=MODEL, messages=[]))
    assert (code, body["param"]) == (400, "messages")
    chat = [{"role": "user", "content": "Hi"}]
    code, body = error_of(
        lambda: client.chat.completions.create(model=MODEL, messages=chat, logit_bias={"1": 2})
    )
    assert code == 400 and body["param"] == "logit_bias"
    response = client.completions.create(model=MODEL, prompt="ok", max_tokens=2, temperature=0)
    assert response.usage.completion_tokens >= 1


def test_a_message_name_is_refused_by_name_not_dropped(client):
    """`messages[].name` has no place in a chat template: a 400 naming it, never a reply
    that silently ignored it; null is accepted (SDKs send it), and the server keeps going."""
    named = [{"role": "user", "content": "Hi", "name": "alice"}]
    code, body = error_of(lambda: client.chat.completions.create(model=MODEL, messages=named))
    assert code == 400 and body["param"] == "messages.0.name", body
    assert body["code"] == "unsupported_parameter" and "messages[0].name" in body["message"]
    unnamed = [{"role": "user", "content": "Hi", "name": None}]
    chat = client.chat.completions.create(
        model=MODEL, messages=unnamed, max_tokens=2, temperature=0
    )
    assert chat.usage.completion_tokens >= 1


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server[1] + "/health").json() == {"status": "ok"}


# Auth -------------------------------------------------------------------------------------


@pytest.mark.parametrize("api_key", [None, "wrong"])
def test_missing_or_wrong_token_is_401(server, api_key):
    headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
    response = httpx.post(
        server[1] + "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers
    )
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert ("missing" if api_key is None else "wrong") in error["message"]
    assert httpx.get(server[1] + "/health").status_code == 200  # probes need no token


# Parameters and wire details the openai client does not check ----------------------------


def completion_text(client: openai.OpenAI, **kwargs: object) -> str:
    kwargs = {"model": MODEL, "prompt": "Hello", "max_tokens": 16, **kwargs}
    return client.completions.create(**kwargs).choices[0].text


def test_stop_cuts_the_text_before_the_first_match(client):
    no_eos = {"ignore_eos": True}
    full = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=16, temperature=0, extra_body=no_eos
    ).choices[0]
    assert full.finish_reason == "length" and len(full.text) >= 6, full.text
    stop = full.text[4:6]  # two characters from the middle of the greedy text
    expected = full.text[: full.text.index(stop)]
    for stops in (stop, ["never in this text", stop]):
        cut = client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=16, temperature=0, stop=stops, extra_body=no_eos
        )
        assert (cut.choices[0].text, cut.choices[0].finish_reason) == (expected, "stop")


def test_top_k_1_is_greedy_whatever_the_temperature_and_seed(client):
    greedy = completion_text(client, temperature=0)
    sampled = [completion_text(client, temperature=1.5, seed=s) for s in (1, 2)]
    assert any(text != greedy for text in sampled)  # those seeds do sample something else...
    for seed in (1, 2):  # ...unless top_k keeps the most likely token only
        text = completion_text(client, temperature=1.5, seed=seed, extra_body={"top_k": 1})
        assert text == greedy


def test_streamed_chat_reports_usage_only_when_asked(server, client):
    _, tokens, _ = grpc_text(server, MESSAGES, max_tokens=6, temperature=0.0)
    for include in (True, False):
        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                max_completion_tokens=6,
                temperature=0,
                stream=True,
                stream_options={"include_usage": include},
            )
        )
        assert all(c.usage is None for c in chunks[:-1])
        if not include:
            assert chunks[-1].usage is None and chunks[-1].choices
            continue
        assert chunks[-1].choices == []
        usage = chunks[-1].usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(CHAT_RENDERED), len(tokens))
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_stream_is_json_events_then_a_literal_done_line(server, path):
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "stream": True}
    body.update({"prompt": "Hi"} if path == "/v1/completions" else {"messages": MESSAGES})
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.stream("POST", server[1] + path, json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], raw  # the last event, then nothing
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert chunks and all("error" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_http_requests_are_counted_by_path_and_status(server, client):
    def counts() -> dict[str, float]:
        return {
            k: v
            for k, v in scrape(server[0].metrics_port).items()
            if k.startswith("pdserve_http_requests_total{")
        }

    before = counts()
    client.completions.create(model=MODEL, prompt="x", max_tokens=1, temperature=0)
    client.completions.create(model=MODEL, prompt="x", max_tokens=1, temperature=0)
    error_of(lambda: client.completions.create(model=MODEL, prompt="x", temperature=-1))
    assert post(server[1], {"model": MODEL, "prompt": "x"}, token=None).status_code == 401
    assert httpx.get(server[1] + "/health").status_code == 200
    after = counts()
    grew = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
    assert grew == {
        "pdserve_http_requests_total{path=/v1/completions,status=200}": 2,
        "pdserve_http_requests_total{path=/v1/completions,status=400}": 1,
        "pdserve_http_requests_total{path=/v1/completions,status=401}": 1,
        "pdserve_http_requests_total{path=/health,status=200}": 1,
    }


# Logprobs ----------------------------------------------------------------------------------


def grpc_logprobs(server, prompt, **options) -> tuple[list[int], list]:
    """(token ids, their TokenLogprobs) of the same request through the gRPC API."""
    with GeneratorClient(server[0].address, TOKEN) as grpc_client:
        chunks = list(grpc_client.generate(prompt, logprobs=True, **options))
    return [t for c in chunks for t in c.token_ids], [lp for c in chunks for lp in c.logprobs]


def byte_text(token_id: int) -> str:
    """A tiny-model token's own text (its byte tokenizer: ids above 255 have none)."""
    return bytes([token_id]).decode(errors="replace") if token_id < 256 else ""


def test_completion_logprobs_take_openai_s_shape_with_the_grpc_values(server, client):
    sampling = dict(max_tokens=6, temperature=0.9, seed=3)
    kwargs = dict(model=MODEL, prompt="Hello", extra_body={"ignore_eos": True}, **sampling)
    ids, expected = grpc_logprobs(server, "Hello", top_logprobs=2, ignore_eos=True, **sampling)
    response = client.completions.create(logprobs=2, **kwargs)
    lp = response.choices[0].logprobs
    assert response.usage.completion_tokens == len(ids) == len(expected) == 6
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert lp.tokens == [byte_text(i) for i in ids]
    assert lp.token_logprobs == pytest.approx([e.logprob for e in expected], abs=1e-6)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for top, want, token in zip(lp.top_logprobs, expected, lp.tokens, strict=True):
        # The two likeliest (by text; ids of the same text share one key) and the chosen one.
        allowed = {token: want.logprob} | {byte_text(t): v for t, v in reversed(want.top)}
        assert top == pytest.approx({k: allowed[k] for k in top}, abs=1e-6)
        assert token in top and 1 <= len(top) <= 3
    stream = client.completions.create(logprobs=2, stream=True, **kwargs)
    streamed = [
        v
        for c in stream
        if c.choices and c.choices[0].logprobs
        for v in c.choices[0].logprobs.token_logprobs
    ]
    assert streamed == lp.token_logprobs
    assert client.completions.create(**kwargs).choices[0].logprobs is None  # not asked
    code, body = error_of(lambda: client.completions.create(logprobs=21, **kwargs))
    assert (code, body["param"]) == (400, "logprobs"), body


def test_chat_logprobs_take_openai_s_shape_streamed_or_not(server, client):
    kwargs = dict(
        model=MODEL,
        messages=MESSAGES,
        max_completion_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    ids, expected = grpc_logprobs(server, MESSAGES, max_tokens=6, top_logprobs=3, ignore_eos=True)
    full = client.chat.completions.create(logprobs=True, top_logprobs=3, **kwargs)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens == len(ids) == 6
    for entry, token_id, want in zip(content, ids, expected, strict=True):
        assert entry.token == byte_text(token_id)
        assert entry.bytes == (None if "\ufffd" in entry.token else list(entry.token.encode()))
        assert entry.logprob == pytest.approx(want.logprob, abs=1e-6)
        tops = [(t.token, t.logprob) for t in entry.top_logprobs]
        assert tops == [(byte_text(t), pytest.approx(v, abs=1e-6)) for t, v in want.top]
        # Greedy: the chosen token is the likeliest one.
        assert (entry.token, entry.logprob) == tops[0]
    stream = client.chat.completions.create(logprobs=True, top_logprobs=3, stream=True, **kwargs)
    streamed = [
        e
        for c in stream
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert streamed == content
    assert client.chat.completions.create(**kwargs).choices[0].logprobs is None  # not asked
    code, body = error_of(lambda: client.chat.completions.create(top_logprobs=2, **kwargs))
    assert (code, body["param"]) == (400, "top_logprobs"), body


def test_the_asyncio_client_streams_too(server):
    async def body() -> None:
        client = openai.AsyncOpenAI(base_url=server[1] + "/v1", api_key=TOKEN, max_retries=0)
        stream = await client.completions.create(
            model=MODEL, prompt="Hi", max_tokens=4, stream=True, temperature=0
        )
        texts = [c.choices[0].text async for c in stream if c.choices]
        assert len("".join(texts)) >= 1
        await client.close()

    asyncio.run(body())


def test_pdserve_bench_drives_the_openai_api(server, tmp_path):
    """`pdserve bench --api openai`: the same workload through the HTTP door, every request
    completed with its exact output length (the usage event's count)."""
    token = tmp_path / "token"
    token.write_text(TOKEN)
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--api",
        "openai",
        "--target",
        server[1],
        "--token-file",
        str(token),
        "--concurrency",
        "2",
        "--num-requests",
        "4",
        "--prompt-len",
        "8",
        "--output-len",
        "5",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert pdserve_cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["report"]["completed"] == 4
    assert [r["output_tokens"] for r in result["requests"]] == [5] * 4
    assert all(0 < r["ttft_ms"] <= r["e2e_ms"] for r in result["requests"])
    assert all(r["finish_reason"] == "length" and r["prompt_len"] == 8 for r in result["requests"])
