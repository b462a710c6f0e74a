"""The OpenAI-compatible HTTP API over a real loopback server, called with the official
`openai` client (and raw HTTP where the client hides what is tested): an orchestrator
process with `--http-port 0` in front of the session's tiny workers."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import time

import httpx
import openai
import pytest

import pdserve_cli
from shared.client.generator import GeneratorClient
from shared.weights import convert_cli
from tests.cluster_harness import spawn_orchestrator
from tests.reference import scrape
from tests.worker_harness import WorkerProcess, spawn_worker, stop_worker

pytestmark = pytest.mark.timeout(360)  # the first test starts two workers and an orchestrator
MAX_SEQ_LEN = 512
TOKEN = "sesame"
MODEL = "tiny"
CHAT = "{% for m in messages %}{{ m.role[0] }}:{{ m.content }}|{% endfor %}"
CHAT_RENDERED = "s:Be brief.|u:Hello|"  # the tiny engine's largest bucket is 32 tokens


def http_port(process: WorkerProcess) -> int:
    match = re.search(r"http_port=(\d+)", "".join(process.output))
    assert match, process.output
    return int(match[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(orchestrator process, base URL): the HTTP API with a bearer token in front of tiny
    workers of their own, with a cache long enough (MAX_SEQ_LEN) that a stream is still
    generating when its client goes away. The orchestrator reads `tiny` from a checkpoint
    that also has a chat template (the preset has none), so chat is served too."""
    tmp = tmp_path_factory.mktemp("openai")
    (tmp / "token").write_text(TOKEN)
    assert convert_cli.main(["--preset", "tiny", "--out", str(tmp / "tiny")]) == 0
    (tmp / "tiny" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT}))
    # One after the other, from this thread: a child started from a thread that then exits
    # gets its parent-death signal (PR_SET_PDEATHSIG follows the creating thread).
    processes = [spawn_worker(role, "--max-seq-len", str(MAX_SEQ_LEN))
                 for role in ("prefill", "decode")]  # fmt: skip
    try:
        processes.append(spawn_orchestrator(
            "--prefill", processes[0].address, "--decode", processes[1].address,
            "--model", str(tmp / "tiny"), "--served-model-name", MODEL, "--http-port", "0",
            "--auth-token-file", str(tmp / "token"),
        ))  # fmt: skip
        yield processes[-1], f"http://127.0.0.1:{http_port(processes[-1])}"
    finally:
        for process in reversed(processes):
            stop_worker(process)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=TOKEN, max_retries=0, timeout=60)


def grpc_text(server, prompt, **options) -> tuple[str, list[int], str]:
    """(text, token ids, finish reason) of the same request through the gRPC API."""
    with GeneratorClient(server[0].address, TOKEN) as grpc_client:
        chunks = list(grpc_client.generate(prompt, **options))
    tokens = [t for c in chunks for t in c.token_ids]
    return "".join(c.text for c in chunks), tokens, chunks[-1].finish_reason


def error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as err:
        call()
    return err.value.status_code, err.value.body


SAMPLING = dict(temperature=0.8, top_p=0.9, seed=7)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


# 1-2. Same tokens as gRPC, streaming and not ----------------------------------------------


def test_streamed_completion_equals_grpc_for_the_same_seed(server, client):
    stream = client.completions.create(
        model=MODEL, prompt="Hello, pdserve", max_tokens=12, stream=True,
        stream_options={"include_usage": True}, **SAMPLING,
    )  # fmt: skip
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
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8,
                                          temperature=0)  # fmt: skip
    assert chat.choices[0].message.content == text and chat.choices[0].finish_reason == finish
    rendered = len(CHAT_RENDERED)  # bytes; a chat prompt gets no BOS (the template's job)
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (rendered, len(tokens))


# 3. n ----------------------------------------------------------------------------------------


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


# 4. Bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "status", "param", "message"),
    [
        (dict(model="nope", prompt="x"), 404, "model", "model 'nope' does not exist"),
        (dict(model=MODEL, prompt="x", temperature=-1), 400, "temperature", "greater than"),
        (dict(model=MODEL, prompt="x", presence_penalty=0.5), 400, "presence_penalty",
         "unsupported parameter(s): presence_penalty"),
        (dict(model=MODEL, prompt="x" * 40), 400, None, "longer than the largest prefill"),
        (dict(model=MODEL, prompt="x", max_tokens=10**6), 400, None, "max_tokens=1000000"),
    ],
)  # fmt: skip
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


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server[1] + "/health").json() == {"status": "ok"}


# 5. Disconnect frees the slot ------------------------------------------------------------


def cancelled_count(metrics_port: int) -> float:
    key = "pdserve_requests_total{code=CANCELLED,finish_reason=cancelled}"
    return scrape(metrics_port).get(key, 0.0)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_a_client_that_disconnects_mid_request_frees_its_slot(server, stream):
    base = server[1].removeprefix("http://")
    host, port = base.split(":")
    metrics_port = server[0].metrics_port
    before = cancelled_count(metrics_port)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    # ~500 decode steps: about a second of generation left when the client goes away.
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": MAX_SEQ_LEN - 24,
                       "stream": stream, "ignore_eos": True})  # fmt: skip
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    conn.request("POST", "/v1/completions", body, headers)
    if stream:
        response = conn.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"data: ")  # the stream is live
    else:
        time.sleep(0.1)  # no bytes come back before the end: let it get going
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-request (a response
    conn.close()  # object may still hold the socket's file: shut it down, not just close)
    deadline = time.monotonic() + 20
    while True:
        samples = scrape(metrics_port)
        freed = samples["pdserve_decode_slots_in_use{}"] == 0
        if cancelled_count(metrics_port) == before + 1 and freed:
            break
        assert time.monotonic() < deadline, {
            k: v for k, v in samples.items() if "slots" in k or "requests_total" in k
        }
        time.sleep(0.1)


# 6. Auth ----------------------------------------------------------------------------------


@pytest.mark.parametrize("api_key", [None, "wrong"])
def test_missing_or_wrong_token_is_401(server, api_key):
    headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
    response = httpx.post(server[1] + "/v1/completions", json={"model": MODEL, "prompt": "x"},
                          headers=headers)  # fmt: skip
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert ("missing" if api_key is None else "wrong") in error["message"]
    assert httpx.get(server[1] + "/health").status_code == 200  # probes need no token


def test_the_asyncio_client_streams_too(server):
    async def body() -> None:
        client = openai.AsyncOpenAI(base_url=server[1] + "/v1", api_key=TOKEN, max_retries=0)
        stream = await client.completions.create(model=MODEL, prompt="Hi", max_tokens=4,
                                                 stream=True, temperature=0)  # fmt: skip
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
    argv = ["bench", "--api", "openai", "--target", server[1], "--token-file", str(token),
            "--concurrency", "2", "--num-requests", "4", "--prompt-len", "8",
            "--output-len", "5", "--no-progress", "--out", str(out)]  # fmt: skip
    assert pdserve_cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["report"]["completed"] == 4
    assert [r["output_tokens"] for r in result["requests"]] == [5] * 4
    assert all(0 < r["ttft_ms"] <= r["e2e_ms"] for r in result["requests"])
    assert all(r["finish_reason"] == "length" and r["prompt_len"] == 8 for r in result["requests"])
