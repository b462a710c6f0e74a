"""`pdserve convert`: an HF directory, a GGUF file (or a preset) -> a pdserve orbax checkpoint.

    pdserve convert --hf-dir DIR --out CKPT [--quantize int8|int8-blocks] [--float-lm-head]
    pdserve convert --gguf FILE.gguf --out CKPT [--quantize int8|int8-blocks]

The checkpoint holds the params (int8 + per-channel scales with --quantize int8; int8 +
per-32-weight scales and offsets with int8-blocks, a GGUF's own blocks where its format
has them), the model config, the tokenizer and the chat template, so a server started
with `--model CKPT` needs nothing else.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Sequence

from shared.weights.flags import add_quantize_arguments, quantization_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve convert", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-dir", type=pathlib.Path, help="Hugging Face model directory")
    source.add_argument(
        "--gguf", type=pathlib.Path, help="a llama.cpp GGUF file (llama architecture)"
    )
    source.add_argument("--preset", help="a preset's seeded weights (tiny, small)")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="new checkpoint dir")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    add_quantize_arguments(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    # JAX and orbax only once the flags parsed: `pdserve convert --help` stays instant.
    from shared.config import EngineConfig
    from shared.weights.checkpoint import CheckpointError, load_model, param_bytes, save_checkpoint
    from shared.weights.model_info import load_model_info, save_text_files

    args = build_parser().parse_args(list(argv))
    start = time.perf_counter()
    spec = str(args.hf_dir or args.gguf or args.preset)
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
        save_text_files(load_model_info(spec), args.out.expanduser().resolve())
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
