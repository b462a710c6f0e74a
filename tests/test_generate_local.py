"""`pdserve generate-local` end to end, in process, against the engine reference."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest

import pdserve_cli
from decode_server import local_generate
from shared.config import EngineConfig, ModelConfig
from shared.engine.engine import Engine
from shared.sampling_params import SamplingParams
from shared.tokenizer import ByteTokenizer

# Each test compiles an engine of its own (or runs many steps): more than the default.
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def cli_engine() -> Engine:
    # The same engine layout the CLI builds for --max-seq-len 64.
    return Engine(ModelConfig.tiny(), EngineConfig(1, (16, 32), 64))


# This process has 8 simulated devices (tests/conftest.py) for the tensor-parallel tests;
# generate-local would shard over all of them by default.
ONE_DEVICE = ["--tensor-parallel", "1"]


def run_cli(argv: list[str]) -> list[dict]:
    out = io.StringIO()
    argv = argv if "--model" in argv else ["--model", "tiny", *argv]
    args = local_generate.build_parser().parse_args([*ONE_DEVICE, *argv])
    assert local_generate.run(args, out=out) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_tokens_match_reference(cli_engine: Engine):
    params = cli_engine.init_params(seed=0)
    prompt = [256, 72, 105, 33]
    rows = run_cli(
        [
            "--prompt-token-ids",
            "256,72,105,33",
            "--max-tokens",
            "6",
            "--json",
            "--max-seq-len",
            "64",
        ]
    )
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(np.argmax(cli_engine.reference_logits(params, seq)[-1])))
    assert [r["token_id"] for r in rows[:-1]] == seq[len(prompt) :]
    assert rows[-1] == {
        "finish_reason": "length",
        "usage": {"prompt_tokens": 4, "completion_tokens": 6},
        "text": "",
    }


def test_text_output_is_the_detokenized_token_stream(capsys: pytest.CaptureFixture[str]):
    flags = ["--max-tokens", "8", "--max-seq-len", "64"]
    rows = run_cli([*flags, "--json", "hi"])
    tokens = [r["token_id"] for r in rows if "token_id" in r]
    assert "".join(r["text"] for r in rows) == ByteTokenizer(320).decode(tokens)
    assert pdserve_cli.main(["generate-local", *ONE_DEVICE, "--model", "tiny", *flags, "hi"]) == 0
    expected = ByteTokenizer(320).decode(tokens)
    printed = capsys.readouterr()
    assert printed.out == expected + "\n"
    assert printed.err == "[finish: length, 8 tokens]\n"


def test_eos_ends_the_stream_as_stop_and_is_never_a_token(cli_engine: Engine):
    """EOS is not yielded: the stream ends with "stop", as a decode worker ends it."""
    params = cli_engine.init_params(seed=0)
    prompt = [256, 72, 105, 33]
    greedy = list(local_generate.stream_tokens(cli_engine, params, prompt, SamplingParams(), 6))
    tokens = [t for t, _ in greedy if t is not None]
    assert len(tokens) == 6 and greedy[-1] == (None, "length")
    # The same weights under a config whose EOS is the third greedy token.
    config = dataclasses.replace(ModelConfig.tiny(), eos_id=tokens[2])
    eos_engine = Engine(config, cli_engine.config)
    ended = list(local_generate.stream_tokens(eos_engine, params, prompt, SamplingParams(), 6))
    assert ended == [(tokens[0], None), (tokens[1], None), (None, "stop")]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--top-p", "1.5", "x"], "top_p=1.5 must be in (0, 1]"),
        (["--max-tokens", "0", "x"], "--max-tokens=0 must be > 0"),
        (["--model", "huge", "x"], "--model 'huge': not a preset"),
        (["--prompt-token-ids", "1,999", "--max-seq-len", "64"], "token id 999"),
        ([], "give a prompt, --prompt-token-ids or --messages"),
        (["--tensor-parallel", "3", "x"], "--tensor-parallel=3 does not fit this model"),
        (["--tensor-parallel", "16", "x"], "needs 16 devices; this host has 8"),
    ],
)
def test_bad_input_exits_2_with_message(argv: list[str], message: str, capsys):
    assert local_generate.main(argv if "--model" in argv else ["--model", "tiny", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_subcommand(capsys: pytest.CaptureFixture[str]):
    assert pdserve_cli.main(["nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_generate_local_serves_an_hf_directory_exactly():
    """--model takes a Hugging Face directory (converted on load): the tokens equal the
    continuation transformers recorded for the fixture prompt."""
    fixture = "tests/fixtures/hf/llama_gqa"
    reference = json.loads(Path(fixture, "reference.json").read_text())
    prompt, expected = reference["prompts"][1], reference["continuations"][1]
    rows = run_cli(
        [
            "--model",
            fixture,
            "--max-tokens",
            str(len(expected)),
            "--json",
            "--max-seq-len",
            "64",
            "--prompt-token-ids",
            ",".join(map(str, prompt)),
        ]
    )
    assert [r["token_id"] for r in rows if "token_id" in r] == expected


@pytest.mark.timeout(120)  # may be the test that starts the session's process cluster
@pytest.mark.parametrize(
    "prompt", [["--prompt-token-ids", "256,72,105,33"], ["Hello, pdserve"]], ids=["ids", "text"]
)
def test_generate_and_generate_local_print_the_same_lines(process_cluster, prompt, capsys):
    """The same request through the cluster (`pdserve generate --json`) and in process
    (`pdserve generate-local --json`): the same JSON lines, line for line."""
    flags = ["--json", "--max-tokens", "12", *prompt]
    target = process_cluster.orchestrator.address
    assert pdserve_cli.main(["generate", "--target", target, *flags]) == 0
    served = capsys.readouterr().out.splitlines()
    local_flags = [*ONE_DEVICE, "--model", "tiny", "--max-seq-len", "64"]
    assert pdserve_cli.main(["generate-local", *local_flags, *flags]) == 0
    local = capsys.readouterr().out.splitlines()
    assert served == local
    rows = [json.loads(line) for line in local]
    assert [set(r) for r in rows[:-1]] == [{"token_id", "text"}] * (len(rows) - 1)
    assert set(rows[-1]) == {"finish_reason", "usage", "text"}
    assert rows[-1]["usage"]["completion_tokens"] == len(rows) - 1
