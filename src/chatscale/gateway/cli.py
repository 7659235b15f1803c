"""`chatscale gateway --config fleet.yaml`: the fleet's one OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gateway", help="one OpenAI-compatible endpoint in front of a fleet of replicas")
    p.add_argument("--config", required=True, type=Path, help="fleet.yaml (reloaded when it changes)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--redis-url", default=None, help="share limits and prefix affinity with other gateways")
    p.add_argument("--request-log", type=Path, default=None,
                   help="append one JSON line per request (chatscale simulate reads it as log:PATH)")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from chatscale.gateway.app import create_app
    from chatscale.gateway.config import load

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per probe is noise
    app = create_app(load(args.config), args.config, args.redis_url, args.request_log)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0
