"""Rows map back to their documents; normalised mutual information between routing and labels."""
from __future__ import annotations

import numpy as np
import pytest

from switchsae.analysis.specialisation import document_of_rows, label_shares, normalised_mutual_information

SEP, BOS = 9, 8


def test_rows_map_to_the_document_their_token_comes_from():
    # stream: doc0 = 1 2 3 SEP, doc1 = 4 SEP, doc2 = 5 6 7 ...; windows of 4 = BOS + 3 stream tokens
    windows = np.array([[BOS, 1, 2, 3], [BOS, SEP, 4, SEP], [BOS, 5, 6, 7]])
    rows = np.arange(9)  # drop_first = 1: three rows per window, positions 1..3
    docs = document_of_rows(windows, rows, drop_first=1, separator=SEP)
    assert docs.tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2]  # a separator belongs to the document it ends


def test_mutual_information_is_zero_for_independent_and_one_for_determined_labels():
    expert = np.repeat([0, 1], 50)
    assert normalised_mutual_information(expert, expert.copy()) == pytest.approx(1.0)
    assert normalised_mutual_information(expert, np.tile([0, 1], 50)) == pytest.approx(0.0, abs=1e-12)
    shares = label_shares(expert, np.tile([0, 1], 50), 2, 2)
    np.testing.assert_allclose(shares, 0.5)
