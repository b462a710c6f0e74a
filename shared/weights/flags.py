"""The flags every entry point shares to pick weights: `--model`, `--quantize`,
`--float-lm-head`. Free of JAX, so `pdserve --help` and the chart tests build parsers
without loading it."""

from __future__ import annotations

import argparse

from shared.config import Quantization


def add_model_arguments(parser: argparse.ArgumentParser, default: str = "tiny") -> None:
    """`--model` and the quantization flags; read them back with `quantization_from_args`."""
    parser.add_argument(
        "--model",
        default=default,
        help="preset name (tiny, small), packaged model (smollm2), a .gguf file, a "
        f"`pdserve convert` checkpoint dir, or an HF dir (default: {default})",
    )
    add_quantize_arguments(parser)


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
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
