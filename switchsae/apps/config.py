"""Settings of feature inspection (kept apart from the heavy modules, so the CLI builds its flags fast)."""
from __future__ import annotations

from dataclasses import dataclass

from switchsae.config import opt, require_non_negative, require_positive


@dataclass(frozen=True)
class InspectConfig:
    """What inspection collects per feature and how much of the cache it reads."""

    tokens: int = opt(0, "cache rows to read from its start, rounded up to whole windows (0: all)")
    batch_size: int = opt(4096, "rows per batch, rounded down to whole windows")
    top: int = opt(10, "top-activating examples kept per feature")
    intervals: int = opt(8, "activation intervals sampled per feature (equal parts of the histogram's range)")
    per_interval: int = opt(2, "random examples kept per interval")
    bins: int = opt(32, "histogram bins over [0, 2^ceil(log2 max)] (a power of two)")
    before: int = opt(9, "context tokens shown before an example's token")
    after: int = opt(2, "context tokens shown after it")
    logit_tokens: int = opt(10, "boosted and suppressed output tokens per feature")
    neighbours: int = opt(5, "nearest decoder rows in other experts per feature (0: skip)")
    seed: int = opt(0, "seed of the interval samples")

    def __post_init__(self) -> None:
        require_non_negative(self, "tokens", "neighbours", "before", "after", "seed")
        require_positive(self, "batch_size", "top", "intervals", "per_interval", "bins", "logit_tokens")
        if self.bins & (self.bins - 1):
            raise ValueError(f"bins must be a power of two, got {self.bins}.")
        if self.bins % self.intervals:
            raise ValueError(f"intervals ({self.intervals}) must divide the number of histogram bins ({self.bins}).")
