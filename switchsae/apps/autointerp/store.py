"""The output folder of an autointerp run, which makes it auditable and resumable::

    settings.json     what was asked (run, cache, pages, settings, LLM model); a rerun must match it
    examples.json     every feature's examples as shown to the LLM (written once, reused on resume)
    features.jsonl    one line per finished feature: explanation, scores, every request and reply
    summary.json      means with confidence intervals (rewritten at the end of each run)

A feature is done once its line is in ``features.jsonl``; lines are appended and flushed as each
feature finishes, so whatever a failed or interrupted run had finished stays. A last line cut off
by a kill is dropped on the next open.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

SETTINGS, EXAMPLES, FEATURES, SUMMARY = "settings.json", "examples.json", "features.jsonl", "summary.json"


def _write_json(path: Path, data) -> None:
    """``data`` as JSON in ``path``, written beside it and moved into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class RunStore:
    """The files of one autointerp output folder (see the module doc); ``append`` is thread-safe."""

    def __init__(self, folder: str | Path, settings: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        path = self.folder / SETTINGS
        if path.is_file():
            earlier = json.loads(path.read_text(encoding="utf-8"))
            differ = sorted(k for k in settings.keys() | earlier.keys() if settings.get(k) != earlier.get(k))
            if differ:
                raise ValueError(f"{self.folder} holds an autointerp run with other settings ({', '.join(differ)}); "
                                 f"choose another --out to start a new one.")
        else:
            _write_json(path, settings)
        self.done = self._read_features()

    def _read_features(self) -> dict[int, dict]:
        path = self.folder / FEATURES
        if not path.is_file():
            return {}
        text = path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):  # a line cut off by a kill: drop it
            text = text[:text.rfind("\n") + 1]
            path.write_text(text, encoding="utf-8")
        results = {}
        for line in text.splitlines():
            result = json.loads(line)
            results[result["id"]] = result
        return results

    def examples(self) -> list[dict] | None:
        """The stored examples, None before they are written."""
        path = self.folder / EXAMPLES
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def write_examples(self, entries: list[dict]) -> None:
        _write_json(self.folder / EXAMPLES, entries)

    def append(self, result: dict) -> None:
        """Record one finished feature (flushed to disk before returning)."""
        line = json.dumps(result, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock, open(self.folder / FEATURES, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
            self.done[result["id"]] = result

    def write_summary(self, summary: dict) -> Path:
        _write_json(self.folder / SUMMARY, summary)
        return self.folder / SUMMARY
