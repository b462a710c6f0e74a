"""`pdserve generate-local`: prefill + insert + generate in one process, streamed to stdout.

The smallest end-to-end path through the engine: no servers, no serialization. It prints
what `pdserve generate` prints for the same request (shared/client/output.py), so the two
can be compared line for line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, TextIO

from shared.client.cli import add_chat_arguments, chat_messages, parse_token_ids
from shared.client.generator import Chunk
from shared.client.output import StreamPrinter
from shared.weights.flags import add_model_arguments, quantization_from_args
from shared.weights.packaged import default_model

if TYPE_CHECKING:
    from shared.engine.engine import Engine, Params
    from shared.sampling_params import SamplingParams
    from shared.tokenizer import Tokenizer
    from shared.weights.model_info import ModelInfo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pdserve generate-local", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    p.add_argument("prompt", nargs="?", help="prompt text (or use --prompt-token-ids)")
    # --model (preset, packaged model, GGUF, checkpoint or HF dir), --quantize
    add_model_arguments(p, default=default_model())
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer.json (default: the model's)")
    p.add_argument("--prompt-token-ids", type=parse_token_ids, help="e.g. 1,2,3")
    add_chat_arguments(p)  # --chat, --messages FILE
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument(
        "--tensor-parallel",
        type=int,
        help="shard the model over this many local devices (default: all of them)",
    )
    p.add_argument("--json", action="store_true", help="JSON lines: one per token, then the end")
    return p


def stream_tokens(
    engine: Engine,
    params: Params,
    prompt_ids: Sequence[int],
    sampling: SamplingParams,
    max_tokens: int,
    stop_ids: Sequence[int] = (),
) -> Iterator[tuple[int | None, str | None]]:
    """`(token, None)` for each generated token, then `(None, finish_reason)` once.

    The same ends as a decode worker's: EOS (or one of `stop_ids`, e.g. a chat template's
    end-of-turn token) ends with "stop" and is not yielded; the `max_tokens`-th token, or a
    token that would not fit the cache, ends with "length".
    """
    from decode_server.scheduler import DecodeBatch

    stops = {engine.model_config.eos_id, *stop_ids}
    prefix = engine.prefill(params, prompt_ids, sampling=sampling)
    batch = DecodeBatch(engine)
    batch.insert([prefix], [0])
    token, produced = prefix.first_token, 0
    while True:
        if token in stops:
            yield None, "stop"
            return
        yield token, None
        produced += 1
        # Feeding this token writes position prompt + produced - 1: past the cache, stop.
        if produced == max_tokens or prefix.true_length + produced > engine.config.max_seq_len:
            yield None, "length"
            return
        token = batch.step(params)[0][0]


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    # JAX only now, once the flags parsed: `pdserve generate-local --help` stays instant.
    import jax

    from shared.config import EngineConfig
    from shared.engine.engine import Engine, EngineError
    from shared.engine.mesh import make_mesh
    from shared.sampling_params import SamplingParams
    from shared.serving.worker_config import resolve_dtype
    from shared.tokenizer import HFTokenizer, IncrementalDetokenizer
    from shared.weights.checkpoint import load_model
    from shared.weights.model_info import load_model_info

    out, err = out or sys.stdout, err or sys.stderr
    if args.max_tokens <= 0:
        raise EngineError(f"--max-tokens={args.max_tokens} must be > 0")
    messages = chat_messages(args)
    if args.prompt is None and args.prompt_token_ids is None and messages is None:
        raise EngineError("give a prompt, --prompt-token-ids or --messages")
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    # One slot, and buckets that cover prompts up to half the cache.
    buckets = tuple(b for b in (16, 32, 64, 128, 256, 512, 1024) if b < args.max_seq_len)
    engine_config = EngineConfig(1, buckets, args.max_seq_len, resolve_dtype(args.dtype))
    mesh = make_mesh(args.tensor_parallel or len(jax.local_devices()))
    loaded = load_model(
        args.model, engine_config=engine_config, quantize=quantization_from_args(args), mesh=mesh
    )
    model_config = loaded.model_config
    info = load_model_info(args.model)
    tokenizer: Tokenizer = (
        HFTokenizer(args.tokenizer, model_config.bos_id, model_config.eos_id)
        if args.tokenizer
        else info.tokenizer
    )
    prompt_ids, stop_ids = _prompt(args, messages, tokenizer, info)
    engine = Engine(model_config, engine_config, mesh)
    detok = IncrementalDetokenizer(tokenizer, list(prompt_ids))
    printer = StreamPrinter(out, err, json_lines=args.json)
    completion = 0
    for token, finish in stream_tokens(
        engine, loaded.params, prompt_ids, sampling, args.max_tokens, stop_ids
    ):
        if token is not None:
            completion += 1
            printer.write(Chunk("", (token,), detok.push(token), None))
        else:
            printer.write(Chunk("", (), detok.flush(), finish, len(prompt_ids), completion))
    return 0


def _prompt(
    args: argparse.Namespace,
    messages: list[dict[str, str]] | None,
    tokenizer: Tokenizer,
    info: ModelInfo,
) -> tuple[Sequence[int], tuple[int, ...]]:
    """The prompt's token ids (a chat rendered with the model's template, given ids, or
    encoded text) and the extra ids that end the generation (a chat's end of turn)."""
    from shared.chat import ChatError, ChatMessage, render_chat
    from shared.engine.engine import EngineError

    if messages is None:
        if args.prompt_token_ids is not None:
            return args.prompt_token_ids, ()
        return tokenizer.encode(args.prompt), ()
    if info.chat is None:
        raise EngineError(f"--model {args.model}: the model has no chat template")
    try:
        text = render_chat(info.chat, [ChatMessage(**m) for m in messages])
    except ChatError as err:
        raise EngineError(str(err)) from None
    return tokenizer.encode(text, add_bos=False), info.chat.end_of_turn_ids


def main(argv: Sequence[str]) -> int:
    from shared.config import ConfigError
    from shared.engine.engine import EngineError
    from shared.sampling_params import SamplingError
    from shared.weights.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (
        ConfigError,
        CheckpointError,
        EngineError,
        SamplingError,
        FileNotFoundError,
        ValueError,
    ) as err:
        print(f"pdserve generate-local: error: {err}", file=sys.stderr)
        return 2
