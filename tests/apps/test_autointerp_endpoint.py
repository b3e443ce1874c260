"""Autointerp against real HTTP servers on 127.0.0.1: a scripted one for the endpoint's failures
(bad JSON, no completion, refusals, an unreachable port, a failure halfway), and the embedded
SmolLM2-135M-Instruct behind llama-cpp-python's server for whole runs and resume."""
from __future__ import annotations

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from switchsae.apps.autointerp.client import ChatClient, EndpointError
from switchsae.apps.autointerp.config import EndpointConfig
from switchsae.apps.autointerp.examples import firing_counts
from switchsae.apps.autointerp.server import free_port, local_server
from switchsae.apps.autointerp.store import EXAMPLES, FEATURES, SETTINGS, SUMMARY
from switchsae.apps.inspect import open_inputs
from switchsae.cli import main

COMPLETION = {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
              "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Yes"}}]}
BEHAVIOURS = {  # what the scripted server answers: (status, content type, body)
    "ok": (200, "application/json", json.dumps(COMPLETION)),
    "bad json": (200, "application/json", '{"choices": [{"message": '),
    "no choices": (200, "application/json", '{"id": "c", "object": "chat.completion"}'),
    "html": (200, "text/html", "<html>busy</html>"),
    "500": (500, "application/json", '{"error": {"message": "overloaded"}}'),
    "404": (404, "application/json", '{"error": {"message": "no model named m"}}'),
}


class ScriptedEndpoint(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 answering chat requests by ``script`` (the last entry repeats)."""

    def __init__(self, script: list[str]):
        self.script, self.hits = list(script), 0
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def next_answer(self) -> tuple[int, str, str]:
        behaviour = self.script[min(self.hits, len(self.script) - 1)]
        self.hits += 1
        return BEHAVIOURS[behaviour]


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        status, kind, body = self.server.next_answer()
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    servers = []

    def start(*script: str) -> ScriptedEndpoint:
        servers.append(ScriptedEndpoint(list(script)))
        return servers[-1]
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def live_and_dead(switch_run, tiny_cache) -> tuple[list[int], list[int]]:
    sae, cache = open_inputs(switch_run, tiny_cache)
    counts = firing_counts(sae.eval(), cache, cache.n_tokens, 4096, progress=False)
    return (counts >= 20).nonzero().squeeze(1).tolist(), (counts == 0).nonzero().squeeze(1).tolist()


def _client(url: str, retries: int = 4) -> ChatClient:
    return ChatClient(EndpointConfig(retries=retries, backoff=0.01), url, "m")


def test_malformed_replies_are_retried_until_one_is_good(scripted):
    server = scripted("bad json", "no choices", "html", "500", "ok")
    reply = _client(server.url, retries=5).chat([{"role": "user", "content": "hi"}], 2)
    assert (reply.text, reply.attempts, server.hits) == ("Yes", 5, 5)


def test_malformed_json_fails_after_the_retries(scripted):
    server = scripted("bad json")
    with pytest.raises(EndpointError, match="failed 3 attempts of a request \\(the last: JSONDecodeError"):
        _client(server.url, retries=3).chat([{"role": "user", "content": "hi"}], 2)
    assert server.hits == 3


def test_a_refusal_is_not_retried(scripted):
    server = scripted("404")
    with pytest.raises(EndpointError, match="refused a request: .*no model named m"):
        _client(server.url).chat([{"role": "user", "content": "hi"}], 2)
    assert server.hits == 1


def _autointerp(run, cache, out, *flags: str) -> list[str]:
    return ["autointerp", str(run), "--acts", str(cache), "--out", str(out), "--quiet", "--backoff", "0.01", *flags]


def _one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_an_unreachable_endpoint_is_a_one_line_error(switch_run, tiny_cache, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"
    err = _one_line_error(capsys, _autointerp(switch_run, tiny_cache, tmp_path, "--features", "2", "--endpoint", url,
                                              "--retries", "2"))
    assert err.startswith("switchsae autointerp: error: the LLM endpoint") and "failed 2 attempts" in err
    assert "APIConnectionError" in err


def test_a_latent_that_never_fires_is_refused(switch_run, tiny_cache, tmp_path, capsys, scripted, live_and_dead):
    dead = live_and_dead[1]
    if not dead:
        pytest.skip("every latent of the tiny SAE fires")
    err = _one_line_error(capsys, _autointerp(switch_run, tiny_cache, tmp_path, "--ids", str(dead[0]),
                                              "--endpoint", scripted("ok").url))
    assert f"Latent {dead[0]} never fires in the 6000 rows read" in err


@pytest.mark.parametrize("flags, message", [
    (["--features", "256"], "--features 256 asks for more latents than can be scored"),
    (["--ids", "300"], "Latent 300 is out of range: the SAE has 256 latents"),
    ([], "Give either --features N"),
])
def test_bad_selections_are_one_line_errors(switch_run, tiny_cache, tmp_path, capsys, scripted, flags, message):
    err = _one_line_error(capsys, _autointerp(switch_run, tiny_cache, tmp_path, *flags, "--endpoint", scripted("ok").url))
    assert message in err


def test_a_failure_halfway_keeps_the_finished_features_and_a_rerun_resumes(switch_run, tiny_cache, tmp_path, capsys,
                                                                           scripted, live_and_dead):
    ids = ",".join(map(str, live_and_dead[0][:3]))
    flags = ["--ids", ids, "--scored", "1", "--concurrency", "1", "--retries", "2"]
    per_feature = 1 + 2 + 2  # explain; detection and fuzzing with one example of each class
    failing = scripted(*["ok"] * (1 + per_feature + 2), "500")  # the check, one feature, then a 500 halfway
    err = _one_line_error(capsys, _autointerp(switch_run, tiny_cache, tmp_path, *flags, "--endpoint", failing.url))
    assert "the 1 features scored so far are kept in" in err and "run the command again to resume" in err
    first = (tmp_path / FEATURES).read_text().splitlines()
    assert len(first) == 1 and (tmp_path / EXAMPLES).is_file()

    healthy = scripted("ok")
    main(_autointerp(switch_run, tiny_cache, tmp_path, *flags, "--endpoint", healthy.url))
    lines = (tmp_path / FEATURES).read_text().splitlines()
    assert len(lines) == 3 and lines[0] == first[0]
    assert healthy.hits == 1 + 2 * per_feature  # the check, then only the two features not done
    summary = json.loads((tmp_path / SUMMARY).read_text())
    assert summary["features"] == 3 and summary["this_run"]["features"] == 2
    assert "prompts, replies and scores in" in capsys.readouterr().out


needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python[server] is not installed (bash scripts/install_llm.sh)")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The embedded SmolLM2-135M-Instruct on llama-cpp-python's server, as autointerp starts it."""
    with local_server(tmp_path_factory.mktemp("llm") / "server.log") as url:
        yield url


@needs_llama_cpp
def test_the_local_model_explains_scores_and_resumes_end_to_end(switch_run, tiny_cache, tmp_path, smollm2, capsys):
    """Without --endpoint the command serves the embedded model itself; a rerun (here against the
    fixture's server of the same model) scores only the features not done."""
    argv = _autointerp(switch_run, tiny_cache, tmp_path, "--features", "2", "--scored", "1", "--concurrency", "2")
    main(argv)
    out = capsys.readouterr().out
    assert "autointerp with smollm2-135m-instruct: 2 features" in out and "detection" in out
    lines = (tmp_path / FEATURES).read_text().splitlines()
    results = [json.loads(line) for line in lines]
    assert len(results) == 2 and json.loads((tmp_path / SETTINGS).read_text())["model"] == "smollm2-135m-instruct"
    for result in results:
        assert result["calls"][0]["task"] == "explain" and result["calls"][0]["reply"]
        for test in ("detection", "fuzzing"):
            calls = [c for c in result["calls"] if c["task"] == test]
            assert sorted(c["truth"] for c in calls) == [False, True] and all(c["messages"] for c in calls)
            assert result[test]["balanced_accuracy"] in (0.0, 0.5, 1.0)
    summary = json.loads((tmp_path / SUMMARY).read_text())
    assert set(summary["per_expert"]) <= {"0", "1", "2", "3"} and summary["this_run"]["features_per_minute"] > 0

    (tmp_path / FEATURES).write_text(lines[0] + "\n")  # as if the run had stopped after one feature
    main([*argv, "--endpoint", smollm2])
    again = (tmp_path / FEATURES).read_text().splitlines()
    assert again[0] == lines[0] and len(again) == 2
    assert json.loads((tmp_path / SUMMARY).read_text())["this_run"]["features"] == 1


def test_examples_come_from_feature_pages_with_inspect(switch_run, tiny_cache, pages_dir, tmp_path, scripted):
    from switchsae.apps.pages import load_record

    server = scripted("ok")
    main(_autointerp(switch_run, tiny_cache, tmp_path, "--features", "2", "--scored", "1", "--inspect", str(pages_dir),
                     "--endpoint", server.url))
    for entry in json.loads((tmp_path / EXAMPLES).read_text()):
        record = load_record(pages_dir, entry["id"])
        shown = {e[0] for e in record["top"]} | {e[0] for g in record["samples"] for e in g["examples"]}
        assert {e["row"] for e in entry["explain"] + entry["positives"]} <= shown
        assert entry["explain"][0]["row"] == record["top"][0][0] and entry["count"] == record["count"]
    assert json.loads((tmp_path / SUMMARY).read_text())["features"] == 2


def test_pages_of_another_sae_are_refused(tiny_cache, pages_dir, tmp_path, capsys, scripted):
    other = tmp_path / "topk"
    main(["train", "--acts", str(tiny_cache), "--arch", "topk", "--width", "64", "--k", "4", "--steps", "2",
          "--batch-size", "64", "--out", str(other), "--quiet"])
    err = _one_line_error(capsys, _autointerp(other, tiny_cache, tmp_path / "out", "--features", "2", "--inspect",
                                              str(pages_dir), "--endpoint", scripted("ok").url))
    assert "are of another SAE or cache" in err


@needs_llama_cpp
def test_the_server_loads_models_into_plain_cpu_buffers_and_otherwise_with_llamas_defaults():
    """The AMX repack buffers crash llama.cpp's decode on some Intel hosts; only that setting changes."""
    import ctypes

    import llama_cpp.llama_cpp as llama_c

    from switchsae.apps.autointerp.llama_serve import plain_buffer_model_params

    ours, theirs = plain_buffer_model_params(), llama_c.llama_model_default_params()
    assert theirs.use_extra_bufts and not ours.use_extra_bufts
    scalars = [name for name, kind in llama_c.llama_model_params._fields_  # pointers are compared by address
               if issubclass(kind, ctypes._SimpleCData) and not kind.__name__.endswith("_p")]
    assert "n_gpu_layers" in scalars and "vocab_only" in scalars
    differing = [name for name in scalars if name != "use_extra_bufts" and getattr(ours, name) != getattr(theirs, name)]
    assert differing == []
