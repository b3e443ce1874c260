"""One feature explained and scored: the explainer's request, then one scorer request per test
example, every request and reply kept in the result.

- **Detection**: the held-out activating examples (truth: active) and as many non-activating
  contexts (truth: not active), shown unmarked; the scorer says whether the feature is active in
  the text.
- **Fuzzing**: the held-out activating examples with their firing token marked (truth: active), and
  as many with a token marked where ``z_j = 0`` (truth: not active; from the other held-out
  examples first, then from the non-activating contexts); the scorer says whether the feature is
  active on the marked token.

A reply with no yes/no in it counts as No (and is counted as unparsed). Balanced accuracy per test:
:func:`~switchsae.apps.autointerp.stats.balanced_accuracy`.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from switchsae.apps.autointerp import prompts
from switchsae.apps.autointerp.client import ChatClient
from switchsae.apps.autointerp.stats import balanced_accuracy, confusion

#: reply limits; a verdict gets 8 tokens since small scorers answer in a sentence ("The feature is not active")
EXPLAIN_TOKENS, VERDICT_TOKENS = 64, 8


def quiet_positions(example: dict) -> list[int]:
    """Positions of the context where the feature is known not to fire (``z = 0``), its own token aside."""
    return [i for i, z in enumerate(example["acts"]) if z == 0 and i != example["at"] and example["tokens"][i].strip()]


def fuzz_cases(positives: list[dict], others: list[dict], negatives: list[dict], n: int,
               rng: np.random.Generator) -> list[tuple[dict, int, bool]]:
    """``(example, marked position, truth)`` of the fuzzing test: ``n`` correctly marked held-out
    examples, then up to ``n`` wrongly marked ones (a quiet token of ``others``, then of ``negatives``)."""
    cases = [(example, example["at"], True) for example in positives[:n]]
    wrong: list[tuple[dict, int, bool]] = []
    for example in others + positives + negatives:
        if len(wrong) == n:
            break
        quiet = quiet_positions(example)
        if quiet:
            wrong.append((example, quiet[int(rng.integers(len(quiet)))], False))
    return cases + wrong


def _test_result(calls: list[dict]) -> dict:
    counts = confusion([c["truth"] for c in calls], [c["verdict"] is True for c in calls])
    return {**counts, "balanced_accuracy": balanced_accuracy(counts),
            "unparsed": sum(c["verdict"] is None for c in calls)}


def _ask(client: ChatClient, task: str, messages: prompts.Messages, max_tokens: int, **fields) -> dict:
    reply = client.chat(messages, max_tokens)
    return {"task": task, **fields, "messages": messages, "reply": reply.text, "attempts": reply.attempts,
            "seconds": round(reply.seconds, 3)}


def _scoring_calls(client: ChatClient, explanation: str, entry: dict, n: int,
                   rng: np.random.Generator) -> Iterator[dict]:
    positives, negatives = entry["positives"][:n], entry["negatives"][:n]
    for example, truth in [(e, True) for e in positives] + [(e, False) for e in negatives]:
        call = _ask(client, "detection", prompts.detect_messages(explanation, example), VERDICT_TOKENS,
                    truth=truth, row=example["row"])
        yield {**call, "verdict": prompts.parse_verdict(call["reply"])}
    others = entry["positives"][n:]
    for example, position, truth in fuzz_cases(positives, others, entry["negatives"], n, rng):
        call = _ask(client, "fuzzing", prompts.fuzz_messages(explanation, example, position), VERDICT_TOKENS,
                    truth=truth, row=example["row"], marked=position)
        yield {**call, "verdict": prompts.parse_verdict(call["reply"])}


def score_feature(client: ChatClient, entry: dict, n: int, seed: int) -> dict:
    """Explain the feature of ``entry`` (:func:`~switchsae.apps.autointerp.examples.feature_entry`) and
    score the explanation on ``n`` + ``n`` examples per test; the result holds every request."""
    start = time.perf_counter()
    rng = np.random.default_rng([seed, entry["id"], 2])
    explain = _ask(client, "explain", prompts.explain_messages(entry["explain"]), EXPLAIN_TOKENS)
    explanation = prompts.parse_explanation(explain["reply"])
    calls = list(_scoring_calls(client, explanation, entry, n, rng))
    stats = {name: entry[name] for name in ("id", "expert", "count", "density") if name in entry}
    return {**stats, "explanation": explanation,
            "detection": _test_result([c for c in calls if c["task"] == "detection"]),
            "fuzzing": _test_result([c for c in calls if c["task"] == "fuzzing"]),
            "seconds": round(time.perf_counter() - start, 3), "calls": [explain, *calls]}
