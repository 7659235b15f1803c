"""The HTTP server's own settings (the engine's are EngineConfig), shared by the CLI and tests.

Light on purpose: `chatscale --help` imports this, so it must not pull in FastAPI or torch.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

TOOL_CALL_PARSERS = ("hermes", "llama3_json")  # server/tools/parsers.py; kept here to keep --help light


@dataclass
class ServerSettings:
    served_model_name: str = "chatscale"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # set: every path but /health needs `Authorization: Bearer KEY`
    max_concurrent_sequences: int = 512  # sequences in flight (queued or running), prompts x n each; beyond: 429
    max_sequences_per_request: int = 256  # prompts x n of one request; beyond: 400
    max_body_bytes: int = 8 * 2**20
    body_timeout: float = 30.0  # seconds a client gets to send its whole request body; slower: 408
    drain_timeout: float = 30.0  # SIGTERM: seconds in-flight requests get to finish
    always_include_usage: bool = False  # every stream ends with a usage chunk, asked for or not
    tool_call_parser: str | None = None  # hermes | llama3_json; None: from the chat template

    def __post_init__(self) -> None:
        positive = ("max_concurrent_sequences", "max_sequences_per_request", "max_body_bytes", "body_timeout")
        if any(getattr(self, name) <= 0 for name in positive) or self.drain_timeout < 0:
            raise ValueError(f"{', '.join(positive)} must be positive and drain_timeout >= 0")
        if self.tool_call_parser not in (None, *TOOL_CALL_PARSERS):
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}")

    @staticmethod
    def add_cli_args(p: argparse.ArgumentParser) -> None:
        d = {f.name: f.default for f in fields(ServerSettings)}
        p.add_argument("--host", default=d["host"])
        p.add_argument("--port", type=int, default=d["port"])
        p.add_argument("--api-key", default=os.environ.get("CHATSCALE_API_KEY", d["api_key"]),
                       help="require `Authorization: Bearer KEY` on every path but /health "
                            "(default: $CHATSCALE_API_KEY, which keeps the key out of `ps`)")
        p.add_argument("--max-concurrent-sequences", type=int, default=d["max_concurrent_sequences"],
                       help="sequences in flight (a request holds prompts x n) before answering 429 with Retry-After")
        p.add_argument("--max-sequences-per-request", type=int, default=d["max_sequences_per_request"],
                       help="prompts x n one request may ask for; more is a 400")
        p.add_argument("--max-body-bytes", type=int, default=d["max_body_bytes"], help="larger bodies get 413")
        p.add_argument("--body-timeout", type=float, default=d["body_timeout"],
                       help="seconds a client gets to send its whole request body; slower ones get 408")
        p.add_argument("--drain-timeout", type=float, default=d["drain_timeout"],
                       help="on SIGTERM, seconds in-flight requests get to finish before they are cut")
        p.add_argument("--always-include-usage", action="store_true",
                       help="end every stream with a usage chunk, even unasked (clients such as LangChain's "
                            "ChatOpenAI ask only OpenAI's own URLs for it)")
        p.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                       help="how tool calls are read from the model's text (default: from the chat template; "
                            "hermes when the template does not render tools)")
        p.add_argument("--served-model-name", default=None,
                       help="the `model` clients send (default: a packaged model's name such as smollm2, "
                            "else the model directory's or file's name)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, model_path: str) -> "ServerSettings":
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name != "served_model_name"}
        from chatscale.models.packaged import PACKAGED

        packaged = args.model if getattr(args, "model", None) in PACKAGED else None
        return cls(served_model_name=args.served_model_name or packaged or Path(model_path).name, **values)
