"""`pdserve generate-local` end to end, in process, against the engine reference."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

import pdserve_cli
from shared.config import EngineConfig, ModelConfig
from shared.engine.engine import Engine
from shared.serving import local_generate
from shared.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def cli_engine() -> Engine:
    # The same engine layout the CLI builds for --max-seq-len 64.
    return Engine(ModelConfig.tiny(), EngineConfig(1, (16, 32), 64))


def run_cli(argv: list[str]) -> list[dict]:
    out = io.StringIO()
    args = local_generate.build_parser().parse_args(argv)
    assert local_generate.run(args, out=out) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_tokens_match_reference(cli_engine: Engine):
    params = cli_engine.init_params(seed=0)
    prompt = [256, 72, 105, 33]
    rows = run_cli(["--prompt-token-ids", "256,72,105,33", "--max-tokens", "6", "--json",
                    "--max-seq-len", "64"])  # fmt: skip
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(np.argmax(cli_engine.reference_logits(params, seq)[-1])))
    got = [r["token_id"] for r in rows if r["token_id"] is not None]
    assert got == seq[len(prompt) :]


def test_text_output_is_the_detokenized_token_stream(capsys: pytest.CaptureFixture[str]):
    flags = ["--max-tokens", "8", "--max-seq-len", "64"]
    tokens = [r["token_id"] for r in run_cli([*flags, "--json", "hi"]) if r["token_id"] is not None]
    assert pdserve_cli.main(["generate-local", *flags, "hi"]) == 0
    expected = ByteTokenizer(320).decode(tokens)
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--top-p", "1.5", "x"], "top_p=1.5 must be in (0, 1]"),
        (["--max-tokens", "0", "x"], "--max-tokens=0 must be > 0"),
        (["--model", "huge", "x"], "--model 'huge': not a preset"),
        (["--prompt-token-ids", "1,999", "--max-seq-len", "64"], "token id 999"),
        ([], "give a prompt or --prompt-token-ids"),
    ],
)
def test_bad_input_exits_2_with_message(argv: list[str], message: str, capsys):
    assert local_generate.main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_subcommand(capsys: pytest.CaptureFixture[str]):
    assert pdserve_cli.main(["nope"]) == 2
    assert "unknown subcommand 'nope'" in capsys.readouterr().err


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
    assert [r["token_id"] for r in rows if r["token_id"] is not None] == expected
