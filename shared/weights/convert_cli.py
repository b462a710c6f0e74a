"""`pdserve convert`: an HF directory (or a preset) -> a pdserve orbax checkpoint.

    pdserve convert --hf-dir DIR --out CKPT [--quantize int8] [--float-lm-head]

The checkpoint holds the params (int8 + per-channel scales with --quantize int8), the
model config and the tokenizer, so a server started with `--model CKPT` needs nothing else.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Sequence

from shared.config import EngineConfig, Quantization
from shared.weights.checkpoint import CheckpointError, load_model, param_bytes, save_checkpoint


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every entry point shares to pick weights; see `quantization_from_args`."""
    parser.add_argument(
        "--model",
        default="tiny",
        help="preset name (tiny, small), a `pdserve convert` checkpoint dir, or an HF dir",
    )
    _add_quantize_arguments(parser)


def _add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="weight-only int8 (AQT) for every dense matmul; a pre-quantized checkpoint "
        "is int8 whatever this says",
    )
    parser.add_argument(
        "--float-lm-head",
        action="store_true",
        help="with --quantize int8: keep the LM head and the embedding table in float",
    )


def quantization_from_args(args: argparse.Namespace) -> Quantization | None:
    if args.quantize == "none":
        return None
    return Quantization(embedding=not args.float_lm_head, lm_head=not args.float_lm_head)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve convert", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-dir", type=pathlib.Path, help="Hugging Face model directory")
    source.add_argument("--preset", help="a preset's seeded weights (tiny, small)")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="new checkpoint dir")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    _add_quantize_arguments(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    start = time.perf_counter()
    spec = str(args.hf_dir) if args.hf_dir is not None else args.preset
    try:
        loaded = load_model(
            spec,
            engine_config=EngineConfig(dtype=args.dtype),
            quantize=quantization_from_args(args),
        )
        save_checkpoint(
            args.out,
            loaded.model_config,
            loaded.params,
            tokenizer=loaded.tokenizer_path,
            weights=loaded.weights_id,
        )
    except CheckpointError as err:
        print(f"pdserve convert: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.out}: {loaded.model_config.name}, "
        f"{param_bytes(loaded.params) / 2**20:.1f} MiB of params, "
        f"quantization={loaded.model_config.quantization}, weights_id={loaded.weights_id}, "
        f"{time.perf_counter() - start:.1f}s"
    )
    return 0
