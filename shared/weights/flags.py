"""The flags every entry point shares to pick weights: `--model`, `--quantize`,
`--float-lm-head`, declared once (shared/flags.py). Free of JAX, so `pdserve --help` and
the chart tests build parsers without loading it."""

from __future__ import annotations

import argparse
import dataclasses

from shared.config import Quantization
from shared.flags import SERVER_ROLES, Flag, Serve, add_flags
from shared.weights.packaged import default_model

# llama.cpp's block: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks and the Q4_K/Q5_K sub-blocks.
GGUF_BLOCK = 32
QUANTIZE_CHOICES: dict[str, Quantization | None] = {
    "none": None,
    "int8": Quantization(),
    "int8-blocks": Quantization(block_size=GGUF_BLOCK),
}

MODEL = Flag(
    "--model",
    "preset name (tiny, small), packaged model (smollm2), a .gguf file, a `pdserve convert` "
    "checkpoint dir, or an HF dir (the orchestrator reads its tokenizer and vocabulary only)",
    default="tiny",
    roles=SERVER_ROLES,
    chart="model.path",
    serve=Serve(default=default_model, why="smollm2 when its package is installed, else tiny"),
)
QUANTIZE = Flag(
    "--quantize",
    "weight-only int8 for every dense matmul: `int8` one scale per output channel (AQT); "
    "`int8-blocks` a scale and offset per 32 weights, which serves a GGUF's 4/5/8-bit blocks "
    "exactly as stored; a pre-quantized checkpoint is int8 whatever this says",
    default="none",
    choices=tuple(QUANTIZE_CHOICES),
    chart="model.quantize",
    serve=Serve(),
)
FLOAT_LM_HEAD = Flag(
    "--float-lm-head",
    "with --quantize int8(-blocks): keep the LM head and the embedding table in float",
    switch=True,
    serve=Serve(),
)
QUANTIZE_FLAGS = (QUANTIZE, FLOAT_LM_HEAD)


def add_model_arguments(parser: argparse.ArgumentParser, default: str = "tiny") -> None:
    """`--model` (default `default`) and the quantization flags; read them back with
    `quantization_from_args`."""
    model = dataclasses.replace(MODEL, help=f"{MODEL.help} (default: {default})", default=default)
    add_flags(parser, (model, *QUANTIZE_FLAGS), None)


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, QUANTIZE_FLAGS, None)


def quantization_from_args(args: argparse.Namespace) -> Quantization | None:
    quant = QUANTIZE_CHOICES[args.quantize]
    if quant is None or not args.float_lm_head:
        return quant
    return dataclasses.replace(quant, embedding=False, lm_head=False)
