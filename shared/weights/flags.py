"""The flags every entry point shares to pick weights: `--model`, `--quantize`,
`--float-lm-head`. Free of JAX, so `pdserve --help` and the chart tests build parsers
without loading it."""

from __future__ import annotations

import argparse
import dataclasses

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


# llama.cpp's block: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks and the Q4_K/Q5_K sub-blocks.
GGUF_BLOCK = 32
QUANTIZE_CHOICES: dict[str, Quantization | None] = {
    "none": None,
    "int8": Quantization(),
    "int8-blocks": Quantization(block_size=GGUF_BLOCK),
}


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantize",
        choices=tuple(QUANTIZE_CHOICES),
        default="none",
        help="weight-only int8 for every dense matmul: `int8` one scale per output channel "
        "(AQT); `int8-blocks` a scale and offset per 32 weights, which serves a GGUF's "
        "4/5/8-bit blocks exactly as stored; a pre-quantized checkpoint is int8 whatever "
        "this says",
    )
    parser.add_argument(
        "--float-lm-head",
        action="store_true",
        help="with --quantize int8(-blocks): keep the LM head and the embedding table in float",
    )


def quantization_from_args(args: argparse.Namespace) -> Quantization | None:
    quant = QUANTIZE_CHOICES[args.quantize]
    if quant is None or not args.float_lm_head:
        return quant
    return dataclasses.replace(quant, embedding=False, lm_head=False)
