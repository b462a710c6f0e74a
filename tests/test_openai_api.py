"""The OpenAI-compatible HTTP API over a real loopback server, called with the official
`openai` client (and raw HTTP where the client hides what is tested): an orchestrator
process with `--http-port 0` in front of the session's tiny workers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import http.client
import json
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

import pdserve_cli
from shared.client.generator import GeneratorClient
from shared.transport.grpc_transport import GrpcDecodeClient
from shared.transport.types import (
    GenerationLimits,
    ReserveRequest,
    StatusCode,
    TransportError,
)
from shared.weights import convert_cli
from tests.cluster_harness import spawn_orchestrator
from tests.reference import scrape
from tests.worker_harness import TRANSPORT, WorkerProcess, spawn_worker, stop_worker

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


@dataclasses.dataclass
class Cluster:
    prefill: WorkerProcess
    decode: WorkerProcess
    orchestrator: WorkerProcess
    base: str  # the HTTP API's URL
    model: Path  # the checkpoint the orchestrator reads (tiny + a chat template)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    """The HTTP API with a bearer token in front of tiny workers of their own, with a cache
    long enough (MAX_SEQ_LEN) that a stream is still generating when its client goes away.
    The orchestrator reads `tiny` from a checkpoint that also has a chat template (the
    preset has none), so chat is served too."""
    tmp = tmp_path_factory.mktemp("openai")
    (tmp / "token").write_text(TOKEN)
    assert convert_cli.main(["--preset", "tiny", "--out", str(tmp / "tiny")]) == 0
    (tmp / "tiny" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT}))
    # One after the other, from this thread: a child started from a thread that then exits
    # gets its parent-death signal (PR_SET_PDEATHSIG follows the creating thread).
    processes = [
        spawn_worker(role, "--max-seq-len", str(MAX_SEQ_LEN)) for role in ("prefill", "decode")
    ]
    try:
        processes.append(
            spawn_orchestrator(
                "--prefill",
                processes[0].address,
                "--decode",
                processes[1].address,
                "--model",
                str(tmp / "tiny"),
                "--served-model-name",
                MODEL,
                "--http-port",
                "0",
                "--auth-token-file",
                str(tmp / "token"),
            )
        )
        orchestrator = processes[-1]
        base = f"http://127.0.0.1:{http_port(orchestrator)}"
        yield Cluster(processes[0], processes[1], orchestrator, base, tmp / "tiny")
    finally:
        for process in reversed(processes):
            stop_worker(process)


@pytest.fixture
def server(cluster: Cluster) -> tuple[WorkerProcess, str]:
    """(orchestrator process, base URL) of the module's cluster."""
    return cluster.orchestrator, cluster.base


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
    body = json.dumps(
        {
            "model": MODEL,
            "prompt": "x",
            "max_tokens": MAX_SEQ_LEN - 24,
            "stream": stream,
            "ignore_eos": True,
        }
    )
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
    response = httpx.post(
        server[1] + "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers
    )
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert ("missing" if api_key is None else "wrong") in error["message"]
    assert httpx.get(server[1] + "/health").status_code == 200  # probes need no token


# Statuses of a busy, draining or slow server: 429, 503, 504 ------------------------------


def post(base: str, body: dict, token: str | None = TOKEN, path: str = "/v1/completions"):
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.post(base + path, json=body, headers=headers, timeout=60)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def hold_every_slot(address: str) -> list[str]:
    """Lease every free slot of the decode worker at `address` directly (a long TTL and no
    KV ever sent): orchestrators in front of it see no room, so their requests wait in the
    admission queue until `release`."""

    async def run() -> list[str]:
        client = GrpcDecodeClient(address, TRANSPORT)
        leases: list[str] = []
        try:
            while True:
                request = ReserveRequest(f"hold-{len(leases)}", 1, GenerationLimits(1), 120.0)
                try:
                    leases.append((await client.reserve(request)).lease_id)
                except TransportError as err:
                    assert err.code is StatusCode.RESOURCE_EXHAUSTED, err
                    return leases
        finally:
            await client.close()

    return asyncio.run(run())


def release(address: str, leases: list[str]) -> None:
    async def run() -> None:
        client = GrpcDecodeClient(address, TRANSPORT)
        try:
            for lease in leases:
                await client.cancel(lease)
        finally:
            await client.close()

    if leases:
        asyncio.run(run())


def error_body(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


@pytest.mark.timeout(180)
def test_a_full_queue_is_429_with_retry_after_and_draining_is_503(cluster):
    """An orchestrator of its own with `--max-queue 1` in front of the module's workers,
    whose decode slots are all held: one request waits in the queue, the next is 429 with
    `Retry-After`; after SIGTERM new requests are 503 while the queued one is still served
    once the slots free up, and the process then exits cleanly."""
    orch = spawn_orchestrator(
        "--prefill",
        cluster.prefill.address,
        "--decode",
        cluster.decode.address,
        "--model",
        str(cluster.model),
        "--served-model-name",
        MODEL,
        "--http-port",
        "0",
        "--max-queue",
        "1",
    )
    held: list[str] = []
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "temperature": 0}
    try:
        base = f"http://127.0.0.1:{http_port(orch)}"
        assert post(base, body, token=None).status_code == 200  # serving, workers found
        held = hold_every_slot(cluster.decode.address)
        assert len(held) == 4  # tests/worker_harness.py ENGINE_FLAGS: --slots 4
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            queued = pool.submit(post, base, body, None)
            wait_for(
                lambda: scrape(orch.metrics_port)["pdserve_queue_depth{}"] == 1,
                "a request waiting in the admission queue",
            )
            full = post(base, body, token=None)
            assert full.status_code == 429, full.text
            assert full.headers["Retry-After"] == "1"
            error = error_body(full)
            assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
            assert "admission queue is full" in error["message"]

            orch.signal(signal.SIGTERM)  # drain: the queued request is still in flight
            wait_for(lambda: httpx.get(base + "/health").status_code == 503, "draining")
            assert httpx.get(base + "/health").json() == {"status": "draining"}
            refused = post(base, body, token=None)
            assert refused.status_code == 503, refused.text
            error = error_body(refused)
            assert error["type"] == "service_unavailable" and "shutting down" in error["message"]
            assert not queued.done()

            release(cluster.decode.address, held)
            held = []
            answered = queued.result(timeout=60)
        assert answered.status_code == 200, answered.text
        assert answered.json()["usage"]["completion_tokens"] >= 1
        assert orch.wait(30) == 0
    finally:
        release(cluster.decode.address, held)
        stop_worker(orch)


def test_no_healthy_decode_worker_is_503(cluster):
    """An orchestrator whose only decode worker does not answer: 503, OpenAI-shaped."""
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    orch = spawn_orchestrator(
        "--prefill",
        cluster.prefill.address,
        "--decode",
        dead,
        "--model",
        str(cluster.model),
        "--served-model-name",
        MODEL,
        "--http-port",
        "0",
    )
    try:
        base = f"http://127.0.0.1:{http_port(orch)}"
        response = post(base, {"model": MODEL, "prompt": "x", "max_tokens": 2}, token=None)
        assert response.status_code == 503, response.text
        error = error_body(response)
        assert error["type"] == "service_unavailable"
        assert "no healthy decode worker" in error["message"]
        assert httpx.get(base + "/health").status_code == 200  # up, just unable to serve
    finally:
        stop_worker(orch)


@pytest.mark.parametrize("stream", [False, True], ids=["no-stream", "stream"])
def test_a_timeout_that_passes_is_504_and_the_server_keeps_serving(server, stream):
    """`timeout_seconds` (1 ms) passes before the first token: 504, streamed or not (a
    stream's status is decided before any byte is sent)."""
    body = {
        "model": MODEL,
        "prompt": "x",
        "max_tokens": 200,
        "ignore_eos": True,
        "timeout_seconds": 0.001,
        "stream": stream,
    }
    response = post(server[1], body)
    assert response.status_code == 504, response.text
    error = error_body(response)
    assert error["type"] == "timeout" and "timeout" in error["message"]
    body.update(timeout_seconds=30, max_tokens=2)
    assert post(server[1], body).status_code == 200


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
