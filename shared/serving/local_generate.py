"""`pdserve generate-local`: prefill + insert + generate in one process, streamed to stdout.

The smallest end-to-end path through the engine: no servers, no serialization. Scripts
compare outputs with `--json` (one object per generated token).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from typing import TextIO

from shared.config import ConfigError, EngineConfig
from shared.engine.engine import Engine, EngineError, Params
from shared.engine.sampling import SamplingError, SamplingParams
from shared.serving.worker_config import resolve_dtype
from shared.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer, Tokenizer
from shared.weights.checkpoint import CheckpointError, load_model
from shared.weights.convert_cli import add_model_arguments, quantization_from_args


def parse_token_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prompt-token-ids takes comma-separated integers, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve generate-local", description=__doc__)
    p.add_argument("prompt", nargs="?", help="prompt text (or use --prompt-token-ids)")
    add_model_arguments(p)  # --model (preset, checkpoint or HF dir), --quantize
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer.json (default: the model's)")
    p.add_argument("--prompt-token-ids", type=parse_token_ids, help="e.g. 1,2,3")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--json", action="store_true", help="one JSON object per generated token")
    return p


def stream_tokens(
    engine: Engine,
    params: Params,
    prompt_ids: Sequence[int],
    sampling: SamplingParams,
    max_tokens: int,
) -> Iterator[int]:
    """Yield generated token ids: the prefill's first token, then one per decode step.

    Stops at `max_tokens`, at EOS (yielded), or when the cache is full.
    """
    eos = engine.model_config.eos_id
    prefix = engine.prefill(params, prompt_ids, sampling=sampling)
    state = engine.insert(prefix, engine.init_decode_state(), slot=0)
    token, length = prefix.first_token, prefix.true_length
    for produced in range(1, max_tokens + 1):
        yield token
        length += 1
        if token == eos or produced == max_tokens or length >= engine.config.max_seq_len:
            return
        state, tokens = engine.generate(params, state)
        token = int(tokens[0])


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.max_tokens <= 0:
        raise EngineError(f"--max-tokens={args.max_tokens} must be > 0")
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    # One slot, and buckets that cover prompts up to half the cache.
    buckets = tuple(b for b in (16, 32, 64, 128, 256, 512, 1024) if b < args.max_seq_len)
    engine_config = EngineConfig(1, buckets, args.max_seq_len, resolve_dtype(args.dtype))
    loaded = load_model(
        args.model, engine_config=engine_config, quantize=quantization_from_args(args)
    )
    model_config = loaded.model_config
    tokenizer_path = args.tokenizer or loaded.tokenizer_path
    tokenizer: Tokenizer = (
        HFTokenizer(tokenizer_path, model_config.bos_id, model_config.eos_id)
        if tokenizer_path
        else ByteTokenizer(model_config.vocab_size, model_config.bos_id, model_config.eos_id)
    )
    if args.prompt_token_ids is not None:
        prompt_ids = args.prompt_token_ids
    elif args.prompt is not None:
        prompt_ids = tokenizer.encode(args.prompt)
    else:
        raise EngineError("give a prompt or --prompt-token-ids")
    engine = Engine(model_config, engine_config)
    params = loaded.params
    detok = IncrementalDetokenizer(tokenizer, list(prompt_ids))
    for token in stream_tokens(engine, params, prompt_ids, sampling, args.max_tokens):
        text = detok.push(token)
        if args.json:
            print(json.dumps({"token_id": token, "text": text}), file=out, flush=True)
        else:
            print(text, end="", file=out, flush=True)
    tail = detok.flush()
    if args.json and tail:
        print(json.dumps({"token_id": None, "text": tail}), file=out, flush=True)
    elif not args.json:
        print(tail, file=out, flush=True)
    return 0


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ConfigError, CheckpointError, EngineError, SamplingError, FileNotFoundError) as err:
        print(f"pdserve generate-local: error: {err}", file=sys.stderr)
        return 2
