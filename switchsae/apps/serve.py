"""Serve a feature-pages folder over HTTP on 127.0.0.1 (``switchsae serve DIR [--port P]``).

The pages also work straight from ``file://``; the server is for browsers or setups that restrict
local files, or for looking at pages written on another machine through an SSH tunnel.
"""
from __future__ import annotations

import errno
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from switchsae.apps.pages import is_pages

HOST = "127.0.0.1"


class _QuietHandler(SimpleHTTPRequestHandler):
    """Static files from the pages folder, without a log line per request."""

    def log_message(self, format: str, *args) -> None:
        pass


def make_server(folder: str | Path, port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server for the pages in ``folder`` bound to ``127.0.0.1:port`` (0: any free port);
    call ``serve_forever()`` on it. A port already in use is a ValueError."""
    folder = Path(folder)
    if not is_pages(folder):
        raise ValueError(f"{folder} holds no feature pages; write them with `switchsae inspect RUN --acts CACHE --out {folder}`.")
    try:
        return ThreadingHTTPServer((HOST, port), partial(_QuietHandler, directory=str(folder)))
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ValueError(f"Port {port} on {HOST} is already in use; choose another with --port.") from None
        raise ValueError(f"Cannot serve on {HOST}:{port}: {err.strerror}.") from None
