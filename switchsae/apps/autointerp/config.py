"""Settings of automated interpretation (kept apart from the heavy modules, so the CLI builds its flags fast)."""
from __future__ import annotations

from dataclasses import dataclass

from switchsae.config import opt, require_non_negative, require_positive


@dataclass(frozen=True)
class AutointerpConfig:
    """Which latents are scored, on how many examples, and how much of the cache is read."""

    features: int = opt(0, "live latents to sample, stratified by expert and density (or give --ids)")
    ids: str = opt("", "latent ids and ranges to score instead of a sample, e.g. 0-9,512")
    seed: int = opt(0, "seed of the sample, the example split and the non-activating contexts")
    tokens: int = opt(0, "cache rows read from its start, rounded up to whole windows (0: all)")
    batch_size: int = opt(4096, "rows per batch of the passes over the cache")
    explain_top: int = opt(5, "top-activating examples the explainer reads (the rest are held out)")
    scored: int = opt(5, "held-out activating and as many non-activating examples per test (detection, fuzzing)")
    negative_windows: int = opt(64, "random cache windows encoded to find non-activating contexts")

    def __post_init__(self) -> None:
        if (self.features > 0) == bool(self.ids):
            raise ValueError("Give either --features N (a sample of live latents) or --ids LIST, not both "
                             "and not neither.")
        require_non_negative(self, "features", "seed", "tokens")
        require_positive(self, "batch_size", "explain_top", "scored", "negative_windows")


@dataclass(frozen=True)
class EndpointConfig:
    """The OpenAI-compatible chat endpoint that explains and scores (default: the embedded model, served locally)."""

    endpoint: str = opt("", "base URL of an OpenAI-compatible API, e.g. http://host:8000/v1; "
                            "empty: serve the embedded SmolLM2-135M-Instruct on 127.0.0.1")
    model: str = opt("", "model name sent to the endpoint (empty: the local server's model)")
    api_key_env: str = opt("OPENAI_API_KEY", "environment variable holding the endpoint's API key (unset: none)")
    concurrency: int = opt(4, "requests in flight at once (a thread pool; one feature per thread)")
    retries: int = opt(4, "attempts per request before the run stops (backoff doubles from --backoff)")
    backoff: float = opt(0.5, "seconds before the second attempt of a request")
    timeout: float = opt(120.0, "seconds one request may take")

    def __post_init__(self) -> None:
        require_positive(self, "concurrency", "retries")
        for name in ("backoff", "timeout"):
            if not getattr(self, name) >= 0 or (name == "timeout" and self.timeout == 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {getattr(self, name)}.")
