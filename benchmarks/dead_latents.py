"""How "dead" a latent looks depends on how many tokens it was given the chance to fire on.

A held-out set of T tokens gives each latent of a dense SAE T chances, but each latent of a
Switch SAE with N balanced experts only about T/N (it can fire only on the tokens routed to its
expert), so the usual "never fired on the held-out rows" counts rare latents of a routed SAE as
dead far more often than a dense SAE's. This streams a cache's rows in their stored order through
each SAE and prints, at growing row counts, the fraction of latents that have never fired and the
fraction that fired on fewer than one in 100,000 of the tokens routed to their expert::

    python benchmarks/dead_latents.py --cache runs/cache_wiki --saes runs/final/runs/*-seed0
"""
from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

import switchsae as ss
from switchsae.sources.cache import ActivationCache

RARE = 1e-5  # fires per chance below which a latent counts as rare


@torch.no_grad()
def firing_by_rows(sae, batches: Iterable[Tensor], marks: list[int]) -> tuple[list[dict], Tensor, Tensor]:
    """After the first batch that brings the rows seen to each count in ``marks``: the rows seen, the
    fraction of latents never fired, the fraction fired on fewer than ``RARE`` of their chances
    (tokens routed to their expert) and the fewest chances any latent had. Also, at the end, each
    latent's firing count ``[M]`` and each block of latents' chances ``[blocks]``."""
    sae.eval()
    m = sae.cfg.expert_width
    fired = torch.zeros(sae.cfg.width, dtype=torch.long)
    chances = torch.zeros(sae.cfg.width // m, dtype=torch.long)  # tokens per block of latents
    rows: list[dict] = []
    seen = 0
    pending = sorted(marks)
    for x in batches:
        out = sae(x)
        fired += out.latents.fired(sae.cfg.width)
        # entries per block of latents (a shared expert's block: every token); a dense SAE: every token
        chances += out.extras["assignment"].tokens_per_expert() if "assignment" in out.extras else x.shape[0]
        seen += x.shape[0]
        while pending and seen >= pending[0]:
            pending.pop(0)
            per_latent = chances.repeat_interleave(m).clamp_min(1)
            rows.append({"rows": seen, "never fired": (fired == 0).float().mean().item(),
                         "rare": (fired / per_latent < RARE).float().mean().item(), "fewest chances": int(chances.min())})
        if not pending:
            break
    return rows, fired, chances


def stored_rows(cache: ActivationCache, rows: int, chunk: int = 12_500) -> Iterator[Tensor]:
    """The cache's first ``rows`` rows in stored order, ``chunk`` at a time."""
    for start in range(0, min(rows, cache.n_tokens), chunk):
        yield cache.read(start, min(start + chunk, rows, cache.n_tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, help="activation cache whose rows are streamed")
    parser.add_argument("--saes", nargs="+", required=True, help="trained SAE folders")
    parser.add_argument("--marks", type=int, nargs="+", default=[12_500, 50_000, 200_000, 400_000, 1_000_000],
                        help="row counts to report (at most the cache's rows)")
    args = parser.parse_args()
    cache = ActivationCache(args.cache)
    marks = sorted(mark for mark in args.marks if mark <= cache.n_tokens)
    print(f"cache {args.cache}: {cache.n_tokens:,} rows, streamed in stored order")
    print("| SAE | width | experts | rows | never fired | fired on < 1e-5 of its chances | fewest chances (tokens of an expert) |")
    print("|---|---|---|---|---|---|---|")
    for folder in args.saes:
        sae = ss.load_sae(folder)
        rows, fired, chances = firing_by_rows(sae, stored_rows(cache, max(marks)), marks)
        for row in rows:
            print(f"| {Path(folder).name} | {sae.cfg.width:,} | {sae.cfg.n_experts} | {row['rows']:,} | "
                  f"{row['never fired']:.3f} | {row['rare']:.3f} | {row['fewest chances']:,} |",
                  flush=True)
        if chances.numel() > 1:
            dead = (fired == 0).view(chances.numel(), -1).float().mean(1)
            share = chances.double() / chances.sum()
            print(f"  per expert block at {rows[-1]['rows']:,} rows (share of tokens: never fired): "
                  + ", ".join(f"{s:.3f}: {d:.3f}" for s, d in zip(share.tolist(), dead.tolist())), flush=True)


if __name__ == "__main__":
    main()
