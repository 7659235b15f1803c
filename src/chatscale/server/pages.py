"""The browser pages (chat at GET /, dashboard at GET /dashboard), served with a Content-Security-Policy.

The chat page renders model output, which is untrusted. It is sanitised in the page; the policy is
the second wall: scripts and styles only from this server's files (no inline script, no event-handler
attributes, no `javascript:` URLs), images only from here (a crafted answer cannot beacon data out
through an image URL), requests only to this origin, and no framing.
"""

from __future__ import annotations

from pathlib import Path

from fastapi.responses import FileResponse

STATIC = Path(__file__).parent / "static"
CSP = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def page(name: str) -> FileResponse:
    """One of the HTML pages under static/, with the security headers."""
    return FileResponse(STATIC / name, headers=HEADERS)
