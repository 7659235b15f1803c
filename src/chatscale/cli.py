"""`chatscale` command line: one sub-command per capability.

Each sub-command registers its parser in a small `_add_*` function and imports its heavy modules
(torch, the engine) only when it runs, so `chatscale --help` and light commands stay fast.
"""

from __future__ import annotations

import argparse
import os
import sys


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    from chatscale.engine.config import EngineConfig

    EngineConfig.add_cli_args(p)


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (streams the answer)")
    _add_engine_args(p)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("prompt", nargs="*", help="one question to answer, then exit")
    p.set_defaults(func=_run_chat)


def _run_chat(args: argparse.Namespace) -> int:
    from chatscale.terminal_chat import run_chat

    return run_chat(args)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from chatscale.planner.cli import add_parser

    add_parser(sub)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from chatscale.bench.cli import add_parser

    add_parser(sub)


def _add_tokens(sub: argparse._SubParsersAction) -> None:
    from chatscale.text import add_parser

    add_parser(sub)


def _add_top(sub: argparse._SubParsersAction) -> None:
    from chatscale.top import add_parser

    add_parser(sub)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from chatscale.server.settings import ServerSettings

    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (default 127.0.0.1:8000)")
    _add_engine_args(p)
    ServerSettings.add_cli_args(p)
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from chatscale.server.main import serve

    return serve(args)


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    from chatscale.sim.cli import add_parser

    add_parser(sub)


def _add_gateway(sub: argparse._SubParsersAction) -> None:
    from chatscale.gateway.cli import add_parser

    add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatscale", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_chat(sub)
    _add_serve(sub)
    _add_plan(sub)
    _add_bench(sub)
    _add_tokens(sub)
    _add_top(sub)
    _add_simulate(sub)
    _add_gateway(sub)
    return parser


# Mistakes a user can fix (a missing file, one that does not parse, an unknown name) end with one line
# and exit status 1, not a traceback; CHATSCALE_DEBUG=1 shows the traceback.
USER_ERRORS = (OSError, ValueError)


def error_line(exc: BaseException) -> str:
    """One line saying what went wrong (a file's name first when the error has one)."""
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        if os.environ.get("CHATSCALE_DEBUG"):
            raise
        print(f"chatscale {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
