"""`pdserve generate --target HOST:PORT "prompt"`: stream text from an orchestrator.

Output: see shared/client/output.py (the same format as `pdserve generate-local`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from shared.client.generator import ClientTls, GenerateError, GeneratorClient
from shared.client.output import StreamPrinter


def parse_token_ids(text: str) -> list[int]:
    """`--prompt-token-ids 1,2,3` (also `pdserve generate-local`'s)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prompt-token-ids takes comma-separated integers, got {text!r}"
        ) from None


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """`--chat` and `--messages FILE` (also `pdserve generate-local`'s)."""
    chat = parser.add_mutually_exclusive_group()
    chat.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as one user message, rendered with the model's chat template",
    )
    chat.add_argument(
        "--messages",
        type=Path,
        metavar="FILE",
        help='chat messages from a JSON file: [{"role": "user", "content": "..."}, ...]',
    )


def chat_messages(args: argparse.Namespace) -> list[dict[str, str]] | None:
    """The chat the flags ask for, or None for a plain prompt. Raises ValueError saying
    what is wrong with a messages file."""
    if args.messages is not None:
        try:
            messages = json.loads(args.messages.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--messages {args.messages}: {err}") from None
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in messages
            )
        )
        if not ok:
            raise ValueError(
                f"--messages {args.messages}: expected a non-empty JSON list of "
                '{"role": str, "content": str} objects'
            )
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if args.chat:
        if args.prompt is None:
            raise ValueError("--chat needs a prompt (the user's message)")
        return [{"role": "user", "content": args.prompt}]
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pdserve generate", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    p.add_argument("prompt", nargs="?")
    p.add_argument("--target", default="localhost:50051", help="orchestrator HOST:PORT")
    p.add_argument("--prompt-token-ids", type=parse_token_ids)
    add_chat_arguments(p)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--timeout", type=float, help="the call's deadline in seconds")
    p.add_argument("--token-file", type=Path, help="bearer token (or $PDSERVE_TOKEN)")
    p.add_argument("--json", action="store_true", help="JSON lines: one per token, then the end")
    tls = p.add_argument_group("TLS", "for an orchestrator serving TLS (--tls-cert)")
    tls.add_argument("--tls", action="store_true", help="TLS, trusting the system's roots")
    tls.add_argument("--tls-ca", type=Path, help="TLS, trusting this CA (PEM)")
    tls.add_argument("--tls-cert", type=Path, help="a client certificate (PEM), if asked for")
    tls.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    tls.add_argument("--tls-server-name", help="the name to verify instead of the target host")
    return p


def client_tls(args: argparse.Namespace) -> ClientTls | None:
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name):
        return None
    return ClientTls.from_files(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        messages = chat_messages(args)
    except ValueError as err:
        print(f"pdserve generate: error: {err}", file=sys.stderr)
        return 2
    if args.prompt is None and args.prompt_token_ids is None and messages is None:
        print(
            "pdserve generate: error: give a prompt, --prompt-token-ids or --messages",
            file=sys.stderr,
        )
        return 2
    token = args.token_file.read_text().strip() if args.token_file else None
    token = token or os.environ.get("PDSERVE_TOKEN")
    prompt = args.prompt_token_ids if args.prompt_token_ids is not None else args.prompt
    prompt = messages if messages is not None else prompt
    printer = StreamPrinter(sys.stdout, sys.stderr, json_lines=args.json)
    try:
        tls = client_tls(args)
    except (ValueError, OSError) as err:
        print(f"pdserve generate: error: {err}", file=sys.stderr)
        return 2
    with GeneratorClient(args.target, token, tls) as client:
        try:
            for chunk in client.generate(
                prompt,
                timeout=args.timeout,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
                stop=args.stop,
                ignore_eos=args.ignore_eos,
            ):
                printer.write(chunk)
        except GenerateError as err:
            print(f"\npdserve generate: {err}", file=sys.stderr)
            return 1
    return 0
