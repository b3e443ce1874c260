"""The bounded per-feature summaries against one pass over everything at once."""
from __future__ import annotations

import torch

from switchsae.apps.streaming import BestPerSlot, Pow2Histogram

SLOTS = 9


def _stream(seed: int = 0, batches: int = 25):
    """Batches of (slot, score, row) whose scores grow over the stream (ranges keep widening)."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(batches):
        size = int(torch.randint(0, 40, (1,), generator=generator))
        yield (torch.randint(0, SLOTS, (size,), generator=generator),
               torch.rand(size, generator=generator) * 1.7 ** step + 1e-3,
               torch.arange(size) + 1000 * step)


def test_best_per_slot_equals_one_topk_over_the_whole_stream():
    best = BestPerSlot(SLOTS, 4, {"row": ((), torch.long, -1), "double": ((2,), torch.float16, float("nan"))})
    seen = []
    for slots, scores, rows in _stream():
        best.offer(slots, scores, lambda i, rows=rows, scores=scores: {
            "row": rows[i], "double": torch.stack([scores[i], 2 * scores[i]], 1).half()})
        seen.append((slots, scores, rows))
    slots, scores, rows = (torch.cat(parts) for parts in zip(*seen))
    for slot in range(SLOTS):
        mine = slots == slot
        values, order = scores[mine].topk(min(4, int(mine.sum())))
        assert torch.equal(best.scores[slot, :len(values)], values)
        assert torch.equal(best.payload["row"][slot, :len(values)], rows[mine][order])
        assert torch.equal(best.payload["double"][slot, :len(values), 1], (2 * values).half())
        assert (best.scores[slot, len(values):] == float("-inf")).all()


def test_take_empties_the_slots_and_returns_their_entries():
    best = BestPerSlot(3, 2, {"row": ((), torch.long, -1)})
    best.offer(torch.tensor([0, 0, 0, 2]), torch.tensor([1.0, 3.0, 2.0, 5.0]), lambda i: {"row": i})
    slot, score, payload = best.take(torch.tensor([0, 1]))
    assert slot.tolist() == [0, 0] and score.tolist() == [3.0, 2.0] and payload["row"].tolist() == [1, 2]
    assert (best.scores[0] == float("-inf")).all() and (best.payload["row"][0] == -1).all()
    assert best.scores[2, 0] == 5.0


def test_power_of_two_histogram_equals_binning_with_the_final_range():
    hist = Pow2Histogram(SLOTS, 16)
    seen = []
    for slots, values, _ in _stream(seed=1):
        if len(slots):
            hist.add(slots, values)
        seen.append((slots, values))
    slots, values = (torch.cat(parts) for parts in zip(*seen))
    for slot in range(SLOTS):
        mine = values[slots == slot]
        edge = 2.0 ** torch.ceil(torch.log2(mine.max()))
        assert 2.0 ** int(hist.exponent[slot]) == edge and mine.max() <= edge < 2 * mine.max()
        expected = torch.bincount((mine / edge * 16).floor().long().clamp(max=15), minlength=16)
        assert torch.equal(hist.counts[slot].long(), expected)


def test_histogram_range_of_an_exact_power_of_two_is_that_power():
    hist = Pow2Histogram(1, 4)
    hist.add(torch.tensor([0, 0]), torch.tensor([4.0, 1.0]))
    assert int(hist.exponent[0]) == 2 and hist.counts[0].tolist() == [0, 1, 0, 1]
