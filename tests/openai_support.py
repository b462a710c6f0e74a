"""The OpenAI-compatible API's test cluster and the helpers its test modules share.

`start_openai_cluster` (conftest's session fixture `openai_cluster`): tiny prefill and
decode workers of their own, with sequences long enough (MAX_SEQ_LEN) that a stream is
still generating when its client goes away, and an orchestrator with `--http-port 0` and
a bearer token, reading `tiny` from a checkpoint that also has a chat template (the preset
has none), so chat is served too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from shared.client.generator import GeneratorClient
from shared.cluster.cluster import Cluster
from shared.cluster.processes import Child, kill
from shared.weights import convert_cli
from tests.cluster_harness import process_cluster_spec

MAX_SEQ_LEN = 512
TOKEN = "sesame"
MODEL = "tiny"
CHAT = "{% for m in messages %}{{ m.role[0] }}:{{ m.content }}|{% endfor %}"
CHAT_RENDERED = "s:Be brief.|u:Hello|"  # the tiny engine's largest bucket is 32 tokens


@dataclasses.dataclass
class OpenAiCluster:
    prefill: Child
    decode: Child
    orchestrator: Child
    base: str  # the HTTP API's URL
    model: Path  # the checkpoint the orchestrator reads (tiny + a chat template)


def http_base(orchestrator: Child) -> str:
    """The URL of an orchestrator's HTTP API (started with --http-port)."""
    assert orchestrator.http_port >= 0, "started without --http-port"
    return f"http://127.0.0.1:{orchestrator.http_port}"


def write_chat_checkpoint(directory: Path) -> Path:
    """`tiny` as a checkpoint with a chat template, in `directory`/tiny."""
    assert convert_cli.main(["--preset", "tiny", "--out", str(directory / "tiny")]) == 0
    config = directory / "tiny" / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": CHAT}))
    return directory / "tiny"


@contextlib.contextmanager
def start_openai_cluster(directory: Path) -> Iterator[OpenAiCluster]:
    (directory / "token").write_text(TOKEN)
    model = write_chat_checkpoint(directory)
    orchestrator = ["--model", str(model), "--served-model-name", MODEL, "--http-port", "0"]
    orchestrator += ["--auth-token-file", str(directory / "token")]
    spec = process_cluster_spec(
        worker_flags=("--max-seq-len", str(MAX_SEQ_LEN)), orchestrator_flags=orchestrator
    )
    cluster = Cluster.start(spec)
    try:
        orch = cluster.orchestrator
        assert orch is not None
        prefill, decode = cluster.workers["prefill-0"], cluster.workers["decode-0"]
        yield OpenAiCluster(prefill, decode, orch, http_base(orch), model)
    finally:
        for child in reversed(cluster.children()):
            kill(child)


def post(base: str, body: dict, token: str | None = TOKEN, path: str = "/v1/completions"):
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.post(base + path, json=body, headers=headers, timeout=60)


def error_body(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


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
