"""Do a Switch SAE's experts specialise by topic or author, and would an unchosen expert do as well?

For saved Switch runs (``benchmarks/recipe.py --save``): route evenly spaced blocks of rows of a
Wikipedia cache and of a Gutenberg cache, map each row to its document (stored token ids,
switchsae/analysis/specialisation.py) and its label (the article's ``topic`` in
../shared/data/wikipedia_vital4_en.jsonl, which lists the articles in the corpus's order; a
book's author from its file name), and report the normalised mutual information
``I(expert; label) / H(label)`` with a heatmap of label shares per expert. The reviewers'
overlap question: each token is also encoded by its second most probable expert; we report the
FVE of both reconstructions and, per token, the activation-weighted mean over its chosen
latents of the largest decoder cosine to the second expert's chosen latents.

    python benchmarks/specialisation.py runs/recipe/runs/top1_8x4096-seed0 --wiki runs/cache_wiki \\
        --gutenberg runs/cache_gut --out docs/results/routing_ablation
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch.nn.functional import normalize

from switchsae.analysis.specialisation import document_of_rows, label_shares, normalised_mutual_information
from switchsae.saes.io import load_sae
from switchsae.saes.routing import assignment_from_entries
from switchsae.sources.cache import ActivationCache

WIKI_JSONL = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikipedia_vital4_en.jsonl"


def sample_rows(cache: ActivationCache, blocks: int = 16, size: int = 4096) -> np.ndarray:
    """``blocks`` evenly spaced runs of ``size`` consecutive row ids over the whole cache."""
    starts = np.linspace(0, cache.n_tokens - size, blocks).astype(np.int64)
    return np.concatenate([np.arange(s, s + size) for s in starts])


def labels_of(cache: ActivationCache, rows: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Each row's label index, and the sorted labels (``names``: each document's, in corpus order)."""
    manifest = cache.manifest
    separator = manifest["tokenizer"]["eos_token_id"]
    docs = document_of_rows(cache.windows(), rows, manifest["drop_first"], separator,
                            manifest["tokenizer"]["bos_token_id"] is not None)
    vocabulary = sorted(set(names))
    return np.array([vocabulary.index(names[d]) for d in docs]), vocabulary


def document_labels(cache: ActivationCache) -> list[str]:
    """Each document's label, in corpus order: Wikipedia topics, or Gutenberg authors from file names."""
    corpus = cache.manifest["corpus"]
    if corpus == "wiki-vital":
        return [json.loads(line)["topic"] for line in WIKI_JSONL.open()]
    return [path.name.split("__")[0] for path in sorted(Path(corpus).rglob("*.txt"))]


@torch.no_grad()
def routed_experts(sae, cache: ActivationCache, rows: np.ndarray) -> np.ndarray:
    """The top-1 expert of each row."""
    experts = []
    for start in range(0, len(rows), 4096):
        block = rows[start:start + 4096]
        x = cache.read(int(block[0]), int(block[-1]) + 1) * sae.cfg.act_scale
        experts.append(sae.router_logits(x)[1].argmax(-1).numpy())
    return np.concatenate(experts)


@torch.no_grad()
def second_expert_overlap(sae, x_raw: torch.Tensor) -> dict:
    """FVE through each token's chosen and second-choice expert, and the overlap of their latents."""
    x = x_raw * sae.cfg.act_scale
    probs = sae.router_logits(x)[1]
    tokens = torch.arange(x.shape[0])
    results, codes = {}, {}
    for name, rank in (("chosen", 0), ("second", 1)):
        expert = probs.topk(2, dim=-1).indices[:, rank]
        gate = probs.gather(1, expert[:, None]).squeeze(1)
        a = assignment_from_entries(tokens, expert, gate, sae.cfg.n_experts, x.shape[0], None, probs)
        latents, x_hat, _ = sae._expert_forward(x, a, decode=True)
        variance = (x_raw - x_raw.mean(0)).pow(2).sum()
        results[f"fve_{name}"] = 1 - ((x_raw - x_hat).pow(2).sum() / variance).item()
        codes[name] = latents
    unit = normalize(sae.W_dec, dim=1)
    first, second = codes["chosen"], codes["second"]
    cos = torch.einsum("tkd,tjd->tkj", unit[first.indices], unit[second.indices]).amax(-1)
    weights = first.values.clamp_min(0)
    results["latent_overlap"] = ((cos * weights).sum() / weights.sum()).item()
    return results


def heatmap(shares: np.ndarray, overall: np.ndarray, vocabulary: list[str], path: Path, title: str) -> None:
    """``log2`` of each expert's label share over the label's share of all rows (0: no preference)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = overall > 0
    lift = np.log2(np.maximum(shares[:, present], 1e-6) / overall[present])
    vocabulary = [v for v, keep in zip(vocabulary, present) if keep]
    fig, ax = plt.subplots(figsize=(max(6, len(vocabulary) * 0.45), 0.4 * shares.shape[0] + 2))
    image = ax.imshow(lift, aspect="auto", cmap="RdBu_r", vmin=-2, vmax=2)
    ax.set_xticks(range(len(vocabulary)), vocabulary, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("expert")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="log2(expert's share / overall share)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a saved Switch SAE run folder")
    parser.add_argument("--wiki", required=True)
    parser.add_argument("--gutenberg", required=True)
    parser.add_argument("--out", required=True, help="folder for specialisation.json and figures/")
    args = parser.parse_args()
    sae = load_sae(args.run)
    out = Path(args.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    report = {"run": str(args.run)}
    for name, path in (("wikipedia topic", args.wiki), ("gutenberg author", args.gutenberg)):
        cache = ActivationCache(path)
        rows = sample_rows(cache)
        labels, vocabulary = labels_of(cache, rows, document_labels(cache))
        experts = routed_experts(sae, cache, rows)
        # the same rows with their labels shuffled: what chance alone gives
        chance = normalised_mutual_information(experts, np.random.default_rng(0).permutation(labels))
        report[name] = {"nmi": normalised_mutual_information(experts, labels), "nmi_shuffled": chance,
                        "labels": len(vocabulary), "rows": len(rows)}
        shares = label_shares(experts, labels, sae.cfg.n_experts, len(vocabulary))
        overall = np.bincount(labels, minlength=len(vocabulary)) / len(labels)
        heatmap(shares, overall, vocabulary, out / "figures" / f"experts_by_{name.split()[1]}.png",
                f"{name}: over-representation per expert (NMI {report[name]['nmi']:.3f})")
    wiki = ActivationCache(args.wiki)
    report["second_expert"] = second_expert_overlap(sae, wiki.read(wiki.n_train, min(wiki.n_tokens, wiki.n_train + 8192)))
    (out / "specialisation.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
