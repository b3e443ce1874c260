"""The explainer's and the scorer's chat messages, and how their answers are read.

An example is a context of token texts with the feature's activation on each token
(``{"tokens": [str], "acts": [float | None], "at": i, ...}``, see :mod:`.examples`). The explainer
sees its examples with every token where the feature is active marked ``<<like this>>``; the
scorer sees one text per request: for detection unmarked (is the feature active anywhere in it?),
for fuzzing with exactly one token marked (is the feature active on that token?). One example per
request keeps the answer a single Yes or No, which even a 135M-parameter model gives reliably
enough to read; the explanation comes first in the scorer's prompt, so a server that reuses a
cached prompt prefix evaluates only the text of each new request.
"""
from __future__ import annotations

import re
from collections import Counter

MARK_OPEN, MARK_CLOSE = "<<", ">>"
Messages = list[dict[str, str]]

EXPLAIN_SYSTEM = (
    "You are an interpretability researcher studying a feature of a language model. You are shown text "
    f"excerpts; the tokens where the feature is active are marked {MARK_OPEN}like this{MARK_CLOSE}. "
    "Write one short sentence saying what the feature detects. Reply with that sentence only.")
DETECT_SYSTEM = (
    "You check an explanation of a feature of a language model. Given the explanation and a text, "
    "answer Yes if the feature is active anywhere in the text, No if it is not. Answer with Yes or No only.")
FUZZ_SYSTEM = (
    "You check an explanation of a feature of a language model. Given the explanation and a text with one "
    f"token marked {MARK_OPEN}like this{MARK_CLOSE}, answer Yes if the feature is active on the marked token, "
    "No if it is not. Answer with Yes or No only.")


def _mark(token: str) -> str:
    """``token`` between the markers, its leading whitespace kept outside them."""
    stripped = token.lstrip()
    return token[:len(token) - len(stripped)] + MARK_OPEN + stripped + MARK_CLOSE


def render(example: dict, marked: set[int] | None = None) -> str:
    """The example's text, the tokens at positions ``marked`` between markers, on one line."""
    marked = marked or set()
    text = "".join(_mark(token) if i in marked else token for i, token in enumerate(example["tokens"]))
    return " ".join(text.split())


def active_positions(example: dict) -> set[int]:
    """Positions of the context where the feature is active (``z > 0``)."""
    return {i for i, z in enumerate(example["acts"]) if z is not None and z > 0}


def explain_messages(examples: list[dict]) -> Messages:
    """The explainer's request: each example with its active tokens marked, numbered."""
    lines = [f"{n}. {render(example, active_positions(example))}" for n, example in enumerate(examples, 1)]
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": "Excerpts:\n" + "\n".join(lines) + "\n\nMost often marked: "
                                        + ", ".join(marked_tokens(examples)) + "\n\nWhat does the feature detect?"}]


def marked_tokens(examples: list[dict], n: int = 8) -> list[str]:
    """The ``n`` token texts the feature is most often active on in ``examples`` (a hint that small
    explainer models need: they rarely find the common word in the excerpts themselves)."""
    counts = Counter(example["tokens"][i].strip() for example in examples for i in active_positions(example))
    return [token for token, _ in counts.most_common(n) if token]


def detect_messages(explanation: str, example: dict) -> Messages:
    """The detection request for one example (shown unmarked)."""
    return [{"role": "system", "content": DETECT_SYSTEM},
            {"role": "user", "content": f"Explanation: {explanation}\n\nText: {render(example)}\n\n"
                                        "Is the feature active in this text? Answer Yes or No."}]


def fuzz_messages(explanation: str, example: dict, position: int) -> Messages:
    """The fuzzing request for one example with the token at ``position`` marked."""
    token = example["tokens"][position].strip()
    return [{"role": "system", "content": FUZZ_SYSTEM},
            {"role": "user", "content": f"Explanation: {explanation}\n\nText: {render(example, {position})}\n\n"
                                        f"Is the feature active on the marked token {MARK_OPEN}{token}{MARK_CLOSE}? "
                                        "Answer Yes or No."}]


_PREFIX = re.compile(r"^\W*(?:explanation|answer|the feature detects|this feature detects)\s*[:\-]\s*", re.IGNORECASE)
_VERDICT = re.compile(r"\b(yes|no|true|false|active|inactive|not active)\b", re.IGNORECASE)


def parse_explanation(text: str) -> str:
    """The explanation in an explainer's reply: its first non-empty line, without a leading label
    (``Explanation:``), list marker or quotes, at most 300 characters; empty if the reply is."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = _PREFIX.sub("", re.sub(r"^\s*(?:\d+[.)]|[-*])\s+", "", line)).strip()
    if len(line) > 1 and line[0] == line[-1] and line[0] in "\"'`":  # quoted whole
        line = line[1:-1].strip()
    return line[:300]


def parse_verdict(text: str) -> bool | None:
    """A scorer's reply read as active (True) or not (False): the first of yes/no/true/false/
    active/inactive/not active in it; None if there is none (the caller counts that as No)."""
    match = _VERDICT.search(text)
    if match is None:
        return None
    return match.group(1).lower() in ("yes", "true", "active")
