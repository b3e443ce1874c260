"""Loss recovered: how much of the LM's next-token loss survives an SAE spliced in at a hook.

Three forward passes per batch of token windows: clean; with the hooked activation replaced
by the SAE's reconstruction; with it zero-ablated. Only the positions the SAE was trained on
are replaced: the first ``drop_first`` positions of every window (the attention sink, left
out of the cache) stay clean in both patched runs. Cross-entropy and KL are averaged over the
next-token predictions made at those replaced positions (predictions at earlier positions
are identical in all three runs, since the model is causal).

    loss_recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean)
    kl_sae = mean KL(p_clean || p_sae),  kl_zero = mean KL(p_clean || p_zero)
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from switchsae.sources.hooks import HookPoint, patched


def _splice(replace: Callable[[Tensor, Tensor], Tensor], drop_first: int, ids: Tensor) -> Callable[[Tensor], Tensor]:
    """A patch function applying ``replace`` to ``[rows, d]`` float32 rows at positions >= drop_first
    (with the token ids of those rows, from the ``[batch, seq]`` windows ``ids``)."""
    def patch(act: Tensor) -> Tensor:
        out = act.clone()
        tail = act[:, drop_first:]
        rows = replace(tail.reshape(-1, tail.shape[-1]).float(), ids[:, drop_first:].reshape(-1))
        out[:, drop_first:] = rows.reshape(tail.shape).to(act.dtype)
        return out
    return patch


def _log_probs(model: nn.Module, ids: Tensor, drop_first: int) -> Tensor:
    """Next-token log-probabilities at positions ``drop_first .. seq-2``, float32 ``[batch, n, vocab]``."""
    logits = model(input_ids=ids, use_cache=False).logits[:, drop_first:-1]
    return F.log_softmax(logits.float(), dim=-1)


def _ce_sum(log_probs: Tensor, targets: Tensor) -> float:
    """Summed cross-entropy of the ``targets`` under ``log_probs``."""
    return -log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()


def loss_recovered(model: nn.Module, hook: HookPoint | str, reconstruct: Callable[[Tensor, Tensor], Tensor],
                   windows: Tensor, batch_size: int = 4, drop_first: int = 1,
                   progress: bool = False) -> dict[str, float]:
    """Clean, SAE-patched and zero-ablated next-token loss of ``model`` on ``[n, seq]`` token ``windows``.

    ``reconstruct`` maps float32 ``[rows, d_model]`` activations and the rows' token ids ``[rows]``
    to their reconstruction.
    Returns ce_clean, ce_sae, ce_zero, loss_recovered, kl_sae, kl_zero and n_predictions.
    """
    if windows.ndim != 2 or windows.shape[1] < drop_first + 2:
        raise ValueError(f"windows must be [n, seq] token ids with seq >= drop_first + 2, "
                         f"got shape {tuple(windows.shape)}.")
    totals = dict.fromkeys(("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero"), 0.0)
    count = 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        batches = windows.to(device).split(batch_size)
        for ids in tqdm(batches, desc="loss recovered", unit="batch", disable=not progress):
            targets = ids[:, drop_first + 1:]
            clean = _log_probs(model, ids, drop_first)
            totals["ce_clean"] += _ce_sum(clean, targets)
            patches = {"sae": _splice(reconstruct, drop_first, ids),
                       "zero": _splice(lambda rows, _: torch.zeros_like(rows), drop_first, ids)}
            for name, patch in patches.items():
                with patched(model, hook, patch):
                    log_probs = _log_probs(model, ids, drop_first)
                totals[f"ce_{name}"] += _ce_sum(log_probs, targets)
                totals[f"kl_{name}"] += F.kl_div(log_probs, clean, log_target=True, reduction="sum").item()
            count += targets.numel()
    result = {key: value / count for key, value in totals.items()}
    gap = result["ce_zero"] - result["ce_clean"]
    result["loss_recovered"] = (result["ce_zero"] - result["ce_sae"]) / gap if gap != 0 else float("nan")
    result["n_predictions"] = count
    return result
