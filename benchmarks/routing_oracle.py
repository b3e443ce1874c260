"""Is a Switch SAE's router or its experts the limit, in and out of domain?

For held-out rows of each cache, every token is reconstructed by each expert in turn (the
steering path, ``sae(x, expert=e)``, gated by the token's top router probability like the chosen
expert) and the squared errors compared::

    FVE(router) = 1 − Σ_t ‖x_t − x̂_t^{router}‖² / Σ_t ‖x_t − x̄‖²
    FVE(oracle) = 1 − Σ_t min_e ‖x_t − x̂_t^{e}‖² / Σ_t ‖x_t − x̄‖²

the fraction of tokens whose routed expert is the best one, and of the others the fraction whose
best expert is the router's second choice. A large gap between the two FVEs means the router sends
tokens to the wrong expert; a small one that the experts themselves fall short::

    python benchmarks/routing_oracle.py --sae runs/reverse_saved/runs/switch8...-seed0 \
        --caches runs/cache_gut1m runs/cache_wiki --rows 16384
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import switchsae as ss
from switchsae.sources.cache import ActivationCache


@torch.no_grad()
def oracle_scores(sae, x: torch.Tensor, batch: int = 4096) -> dict[str, float]:
    """FVE with the router's experts and with each token's best single expert, how often they agree,
    and how often the best is the router's second choice where they do not."""
    sae.eval()
    routed, best, agree, second = 0.0, 0.0, 0, 0
    for start in range(0, x.shape[0], batch):
        xb = x[start:start + batch]
        outs = [sae(xb, expert=e) for e in range(sae.cfg.n_experts)]
        errors = torch.stack([(xb - out.x_hat).pow(2).sum(-1) for out in outs])  # [N, T]
        # forcing the routed expert is the routed forward (same entries and gates): no pass of its own
        choices = outs[0].extras["assignment"].probs.topk(min(2, sae.cfg.n_experts), dim=-1).indices
        routed += errors.gather(0, choices[None, :, 0]).sum().item()
        best += errors.min(0).values.sum().item()
        best_expert = errors.argmin(0)
        agree += int((best_expert == choices[:, 0]).sum())
        second += int((best_expert == choices[:, -1]).sum()) if sae.cfg.n_experts > 1 else 0
    total = (x - x.mean(0)).pow(2).sum().item()
    wrong = x.shape[0] - agree
    return {"fve router": 1 - routed / total, "fve oracle": 1 - best / total, "router picks the best": agree / x.shape[0],
            "best is the second choice": second / wrong if wrong else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", nargs="+", required=True, help="trained Switch SAE folders (top-1 routing)")
    parser.add_argument("--caches", nargs="+", required=True, help="activation caches whose held-out rows are scored")
    parser.add_argument("--rows", type=int, default=16384, help="held-out rows per cache")
    args = parser.parse_args()
    print("| SAE | rows of | FVE, router's expert | FVE, best expert per token | router picks the best | "
          "else the best is its 2nd choice |")
    print("|---|---|---|---|---|---|")
    for folder in args.sae:
        sae = ss.load_sae(folder)
        if sae.cfg.arch != "switch" or sae.cfg.routing.router != "top1" or sae.cfg.routing.shared_expert:
            raise SystemExit(f"{folder}: the oracle compares single experts, so it needs a top-1 Switch SAE")
        for path in args.caches:
            cache = ActivationCache(path)
            x = cache.read(cache.n_train, min(cache.n_train + args.rows, cache.n_tokens))
            scores = oracle_scores(sae, x)
            print(f"| {'/'.join(Path(folder).parts[-3:])} | {Path(path).name} | {scores['fve router']:.4f} | "
                  f"{scores['fve oracle']:.4f} | {scores['router picks the best']:.3f} | "
                  f"{scores['best is the second choice']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
