"""`switchsae serve`: refusals in one line (the served pages themselves are tested in a browser)."""
from __future__ import annotations

import socket
import threading
import urllib.request

import pytest

from switchsae.apps.serve import HOST, make_server
from switchsae.cli import main


def test_a_port_in_use_is_a_one_line_error(pages_dir, capsys):
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit):
            main(["serve", str(pages_dir), "--port", str(port)])
    err = capsys.readouterr().err
    assert f"Port {port} on 127.0.0.1 is already in use; choose another with --port." in err and err.count("\n") == 1


def test_a_folder_without_pages_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["serve", str(tmp_path)])
    assert "holds no feature pages" in capsys.readouterr().err


def test_the_server_answers_on_loopback_only(pages_dir):
    server = make_server(pages_dir, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert server.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/data/meta.js", timeout=10) as reply:
            assert reply.read().startswith(b"SWITCHSAE.put(")
    finally:
        server.shutdown()
        server.server_close()
