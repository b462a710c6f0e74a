"""`pdserve generate --target HOST:PORT "prompt"`: stream text from an orchestrator."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from shared.client.generator import GenerateError, GeneratorClient
from shared.serving.local_generate import parse_token_ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve generate", description=__doc__)
    p.add_argument("prompt", nargs="?")
    p.add_argument("--target", default="localhost:50051", help="orchestrator HOST:PORT")
    p.add_argument("--prompt-token-ids", type=parse_token_ids)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--timeout", type=float, help="the call's deadline in seconds")
    p.add_argument("--token-file", type=Path, help="bearer token (or $PDSERVE_TOKEN)")
    p.add_argument("--json", action="store_true", help="one JSON object per response")
    return p


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if args.prompt is None and args.prompt_token_ids is None:
        print("pdserve generate: error: give a prompt or --prompt-token-ids", file=sys.stderr)
        return 2
    token = args.token_file.read_text().strip() if args.token_file else None
    token = token or os.environ.get("PDSERVE_TOKEN")
    prompt = args.prompt_token_ids if args.prompt_token_ids is not None else args.prompt
    with GeneratorClient(args.target, token) as client:
        try:
            for chunk in client.generate(
                prompt, timeout=args.timeout, max_tokens=args.max_tokens,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
            ):  # fmt: skip
                if args.json:
                    row = {"token_ids": list(chunk.token_ids), "text": chunk.text,
                           "finish_reason": chunk.finish_reason}  # fmt: skip
                    print(json.dumps(row), flush=True)
                else:
                    print(chunk.text, end="", flush=True)
                if chunk.finish_reason and not args.json:
                    print(f"\n[finish: {chunk.finish_reason}, {chunk.completion_tokens} tokens]",
                          file=sys.stderr)  # fmt: skip
        except GenerateError as err:
            print(f"\npdserve generate: {err}", file=sys.stderr)
            return 1
    return 0
