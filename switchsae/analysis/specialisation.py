"""Do experts specialise? Rows mapped back to their documents, and routing against document labels.

Pure functions on arrays; the cache supplies token ids (``ActivationCache.windows``). A cache's
windows cut one stream of documents, each followed by a separator token, with a BOS in front
of every window (sources/text.py), so the document of body token ``i`` of the stream is the
number of separators strictly before it. Row ``r`` of the cache is body token
``w·(L − b) + p − b`` for window ``w``, position ``p`` and ``b`` = 1 with a BOS (0 without).

With ``E`` the expert a row is routed to and ``Y`` its document's label (a Wikipedia topic, a
Gutenberg author), the normalised mutual information ``I(E; Y) / H(Y)`` is 0 when experts see
every label in the same proportions and 1 when the expert determines the label.
"""
from __future__ import annotations

import numpy as np


def document_of_rows(windows: np.ndarray, rows: np.ndarray, drop_first: int, separator: int,
                     has_bos: bool = True) -> np.ndarray:
    """The index of the document each of the cache rows ``rows`` comes from (0 = the first)."""
    bos = int(has_bos)
    body = windows[:, bos:].reshape(-1)
    ends = np.concatenate([[0], np.cumsum(body == separator)[:-1]])  # separators strictly before each token
    per_window = windows.shape[1] - drop_first
    window, position = rows // per_window, rows % per_window + drop_first
    return ends[window * (windows.shape[1] - bos) + position - bos]


def normalised_mutual_information(expert: np.ndarray, label: np.ndarray) -> float:
    """``I(E; Y) / H(Y)`` of two aligned integer arrays (0 if ``Y`` is constant)."""
    joint = np.zeros((expert.max() + 1, label.max() + 1))
    np.add.at(joint, (expert, label), 1)
    joint /= joint.sum()
    p_e, p_y = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nonzero = joint > 0
    mi = float((joint[nonzero] * np.log(joint[nonzero] / (p_e @ p_y)[nonzero])).sum())
    h_y = float(-(p_y[p_y > 0] * np.log(p_y[p_y > 0])).sum())
    return mi / h_y if h_y > 0 else 0.0


def label_shares(expert: np.ndarray, label: np.ndarray, n_experts: int, n_labels: int) -> np.ndarray:
    """``[n_experts, n_labels]``: the fraction of each expert's rows carrying each label."""
    counts = np.zeros((n_experts, n_labels))
    np.add.at(counts, (expert, label), 1)
    return counts / np.maximum(counts.sum(1, keepdims=True), 1)
