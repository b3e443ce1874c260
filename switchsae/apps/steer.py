"""Steering: generate with a feature's decoder direction added at the SAE's hook, the SAE's error kept.

The math. With ``s = cfg.act_scale``, a code ``z`` of raw activation ``x`` and decoder rows
``W_dec[j]``, every SAE here decodes affinely (``SparseAutoencoder.decode``)::

    x̂(z) = (Σ_j z_j W_dec[j] + b_pre) / s

Steering latent ``J`` by ``S`` replaces ``x`` by the steered reconstruction plus the SAE's error::

    x' = x̂(z + S e_J) + (x − x̂(z)) = x + S · W_dec[J] / s

so the shift is the same vector at every token, whether or not ``J`` fires there, of norm
``S ‖W_dec[J]‖ / s`` (``S / s`` for the unit-norm decoder rows of every architecture but ReLU). It
is computed in that second form: no encode/decode round trip whose rounding would leak into the
model, and at ``S = 0`` the patched activation is ``x`` bit for bit, so scale 0 gives exactly the
clean logits. ``S`` is in units of the code as ``encode`` returns it. For a Switch SAE that code is
already gated, ``z_j = g_t · a_j`` (``a`` the expert's TopK activations, ``g_t`` the token's gate,
``p_{i*}`` for top-1 routing), so adding ``S`` to ``z_J`` shifts every token by ``S · W_dec[J] / s``
whichever expert it is routed to; adding ``S`` to the pre-gate ``a_J`` instead would shift token
``t`` by ``g_t · S · W_dec[J] / s``.

Forcing expert ``E`` (Switch SAEs only): ``x̂_E`` is the reconstruction with every token routed to
``E`` (``sae(x, expert=E)``: ``E``'s own TopK, gated as ``saes/routing.py``'s ``forced`` gates it, by
the token's own top-1 probability ``g_t = max_i p_{t,i}``, the scale its code has under top-1
routing), ``x̂`` the normal one, and the error term is kept::

    x' = x̂_E + (x − x̂) [+ S · W_dec[J] / s] = x + (x̂_E − x̂) [+ S · W_dec[J] / s]

This swaps the expert by design, so with ``--expert`` scale 0 does not reproduce the clean model;
only tokens the router already sends to ``E`` keep ``x̂_E = x̂`` (same expert, same gate), up to
rounding.

Positions: the first ``drop_first`` positions (default 1: BOS, the attention sink) stay clean, as
in the activation cache and in loss recovered, so the SAE is only applied where it was trained;
every later prompt position and every generated token is steered. Decoding is greedy by default
(``temperature > 0`` samples, seeded, with the same seed for the clean and the steered run); each
step re-runs the whole sequence, so the patch sees every position at its own index.

Next-token distribution shift at the last prompt position, ``p`` clean and ``q`` steered:
``KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)`` (nats), and the tokens with the largest ``q_v − p_v``
(gained) and ``p_v − q_v`` (lost).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from switchsae.analysis.tables import markdown_table
from switchsae.config import opt
from switchsae.saes import SparseAutoencoder, reads_setting
from switchsae.sources.hooks import HookPoint, as_hook, capture, patched

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class SteerConfig:
    """What to steer and how to generate (``switchsae steer`` flags)."""

    feature: int | None = opt(None, "latent J whose decoder direction is added (optional with --expert)")
    scale: float = opt(0.0, "S: added to the latent's code value, i.e. x += S * W_dec[J] / act_scale")
    expert: int | None = opt(None, "Switch SAEs: reconstruct every token through this expert instead of its "
                                   "routed one, error term kept")
    max_new_tokens: int = opt(20, "tokens to generate after the prompt")
    temperature: float = opt(0.0, "sampling temperature; 0 decodes greedily")
    seed: int = opt(0, "seed of the sampler (temperature > 0), the same for the clean and steered runs")
    drop_first: int = opt(1, "leading positions left clean (the attention sink, left out of the cache)")
    top: int = opt(5, "tokens listed as gained and as lost")

    def __post_init__(self) -> None:
        if self.feature is None and self.expert is None:
            raise ValueError("Nothing to steer: give a feature (--feature), an expert (--expert), or both.")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number, got {self.scale}.")
        if self.max_new_tokens < 0 or self.drop_first < 0 or self.top < 1:
            raise ValueError("max_new_tokens and drop_first must be non-negative and top positive.")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a non-negative number, got {self.temperature}.")


@dataclass(frozen=True)
class TokenShift:
    """One token's next-token probability at the last prompt position, clean and steered."""

    token: str
    token_id: int
    p_clean: float
    p_steered: float


@dataclass
class SteerResult:
    """Both continuations and the next-token distribution shift at the last prompt position."""

    prompt: str
    hook: str
    settings: SteerConfig
    baseline: str
    steered: str
    kl: float
    gained: list[TokenShift] = field(default_factory=list)
    lost: list[TokenShift] = field(default_factory=list)
    #: mean ``‖x' − x‖`` and mean ``‖x‖`` over the steered prompt positions (raw units)
    shift_norm: float = 0.0
    act_norm: float = 0.0

    def format(self) -> str:
        """The result as the text ``switchsae steer`` prints."""
        s = self.settings
        what = [f"feature {s.feature} x {s.scale:g}"] if s.feature is not None else []
        what += [f"expert {s.expert}"] if s.expert is not None else []
        lines = [f"steering {', '.join(what)} at {self.hook}: mean |x' - x| = {self.shift_norm:.4g}, "
                 f"mean |x| = {self.act_norm:.4g} over the steered prompt positions",
                 f"prompt:   {self.prompt!r}", f"baseline: {self.baseline!r}", f"steered:  {self.steered!r}",
                 f"KL(p_clean || p_steered) at the last prompt position: {self.kl:.4g} nats", ""]
        rows = [{"": side, "id": t.token_id, "token": repr(t.token).replace("|", "\\|"), "p_clean": t.p_clean,
                 "p_steered": t.p_steered, "change": t.p_steered - t.p_clean}
                for side, shifts in (("gained", self.gained), ("lost", self.lost)) for t in shifts]
        return "\n".join(lines) + markdown_table(rows, ["", "id", "token", "p_clean", "p_steered", "change"])


class Steering:
    """The patch function at the hook: ``x ↦ x + Δ(x)`` at positions ``≥ drop_first`` of each
    ``[batch, n, d]`` activation (whole sequences: :func:`generate` uses no KV cache),
    ``Δ = S · W_dec[J] / s`` plus, with a forced expert, ``x̂_E − x̂`` (see the module doc)."""

    def __init__(self, sae: SparseAutoencoder, settings: SteerConfig):
        self.sae, self.settings = sae, settings
        direction = torch.zeros(sae.cfg.d_model) if settings.feature is None else sae.W_dec[settings.feature]
        self.direction = (settings.scale * direction / sae.cfg.act_scale).detach().float()

    def shift(self, x: Tensor) -> Tensor:
        """``Δ`` for float32 rows ``x: [rows, d]``."""
        delta = self.direction.to(x.device).expand_as(x)
        if self.settings.expert is None:
            return delta
        with torch.no_grad():
            return delta + self.sae(x, expert=self.settings.expert).x_hat - self.sae(x).x_hat

    def __call__(self, act: Tensor) -> Tensor:
        start = self.settings.drop_first
        if start >= act.shape[1]:
            return act
        tail = act[:, start:].float()
        rows = tail.reshape(-1, tail.shape[-1])
        out = act.clone()
        out[:, start:] = (rows + self.shift(rows)).reshape(tail.shape).to(act.dtype)
        return out


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, drop_first: int = 1) -> Tensor:
    """``[1, n]`` token ids of ``prompt`` as the activation cache tokenises text: BOS (if the
    tokenizer has one) then the text without special tokens; refused if no position is left to
    steer after the first ``drop_first``."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= len(bos):
        raise ValueError("The prompt is empty: it has no tokens to steer.")
    if len(ids) <= drop_first:
        raise ValueError(f"The prompt has {len(ids)} tokens{' with BOS' if bos else ''}, none after the first "
                         f"drop_first={drop_first} positions left clean; give a longer prompt.")
    return torch.tensor([ids], dtype=torch.long)


def next_logits(model: nn.Module, sequence: Tensor) -> Tensor:
    """The float32 next-token logits after ``sequence: [1, n]``, ``[vocab]``, from a whole forward pass."""
    return model(input_ids=sequence, use_cache=False).logits[0, -1].float().cpu()


@torch.no_grad()
def generate(model: nn.Module, ids: Tensor, max_new_tokens: int, temperature: float = 0.0,
             seed: int = 0, eos_token_id: int | None = None) -> tuple[Tensor, list[int]]:
    """The next-token logits at the last prompt position and up to ``max_new_tokens`` continuation
    ids: greedy for ``temperature = 0``, else sampled from ``softmax(logits / temperature)`` with a
    generator seeded by ``seed``; stops after EOS.

    Each step runs the whole sequence again (no KV cache): a patch at the hook then sees every
    position at its own index in every pass, and nothing depends on the cache API of the
    transformers version. That is ``O(n²)`` work, fine for the short continuations steering shows.
    """
    generator = torch.Generator().manual_seed(seed)
    sequence = ids.to(next(model.parameters()).device)
    first = logits = next_logits(model, sequence)
    new: list[int] = []
    for _ in range(max_new_tokens):
        if temperature > 0:
            token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator))
        else:
            token = int(logits.argmax())
        new.append(token)
        if token == eos_token_id or len(new) == max_new_tokens:
            break
        sequence = torch.cat([sequence, sequence.new_tensor([[token]])], dim=1)
        logits = next_logits(model, sequence)
    return first, new


def distribution_shift(clean: Tensor, steered: Tensor, tokenizer: PreTrainedTokenizerBase,
                       top: int) -> tuple[float, list[TokenShift], list[TokenShift]]:
    """``KL(p ‖ q)`` of ``p = softmax(clean)``, ``q = softmax(steered)`` (logits ``[vocab]``), and
    the ``top`` tokens with the largest ``q − p`` and the largest ``p − q``."""
    log_p, log_q = F.log_softmax(clean.double(), -1), F.log_softmax(steered.double(), -1)
    p, q = log_p.exp(), log_q.exp()
    kl = float((p * (log_p - log_q)).sum())

    def shifts(ids: Tensor) -> list[TokenShift]:
        return [TokenShift(str(tokenizer.decode([i])), i, float(p[i]), float(q[i])) for i in ids.tolist()]
    change = q - p
    return kl, shifts(change.topk(top).indices), shifts((-change).topk(top).indices)


def check_settings(sae: SparseAutoencoder, settings: SteerConfig) -> None:
    """Refuse a feature or an expert the SAE does not have, in one sentence."""
    cfg = sae.cfg
    if settings.feature is not None and not 0 <= settings.feature < cfg.width:
        raise ValueError(f"feature {settings.feature} is out of range: this SAE has latents 0..{cfg.width - 1}.")
    if settings.expert is None:
        return
    if not reads_setting(cfg.arch, "n_experts"):
        raise ValueError(f"--expert needs a Switch SAE; this one is {cfg.arch}.")
    if not 0 <= settings.expert < cfg.n_experts:
        raise ValueError(f"expert {settings.expert} is out of range: this SAE has experts 0..{cfg.n_experts - 1}.")


def hooked_activation(model: nn.Module, hook: HookPoint, ids: Tensor, d_model: int) -> Tensor:
    """The clean ``[1, n, d]`` activation of ``ids`` at ``hook``; a hook the model lacks
    (``resolve``'s message) or of another width than the SAE's is refused."""
    act = capture(model, hook, ids)
    if act.shape[-1] != d_model:
        raise ValueError(f"{hook.name} of this model is {act.shape[-1]} wide, but the SAE reads "
                         f"{d_model}-wide activations.")
    return act


@torch.no_grad()
def steer_model(sae: SparseAutoencoder, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                hook: HookPoint | str, prompt: str, settings: SteerConfig) -> SteerResult:
    """Generate from ``prompt`` cleanly and with ``settings``' steering patched in at ``hook``
    (module doc); both continuations and the next-token shift at the last prompt position. The SAE
    is put in eval mode on the model's device."""
    hook = as_hook(hook)
    check_settings(sae, settings)
    ids = prompt_ids(tokenizer, prompt, settings.drop_first)
    act = hooked_activation(model, hook, ids, sae.cfg.d_model)
    sae = sae.eval().to(act.device)
    run = dict(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, seed=settings.seed,
               eos_token_id=tokenizer.eos_token_id)
    clean_logits, clean_ids = generate(model, ids, **run)
    steering = Steering(sae, settings)
    with patched(model, hook, steering):
        steered_logits, steered_ids = generate(model, ids, **run)
    kl, gained, lost = distribution_shift(clean_logits, steered_logits, tokenizer, settings.top)
    rows = act[0, settings.drop_first:].float()
    return SteerResult(prompt, hook.name, settings, str(tokenizer.decode(clean_ids)), str(tokenizer.decode(steered_ids)), kl,
                       gained, lost, float(steering.shift(rows).norm(dim=-1).mean()), float(rows.norm(dim=-1).mean()))


def steer(run: str | Path, prompt: str, settings: SteerConfig, model: str | None = None) -> SteerResult:
    """:func:`steer_model` for the SAE saved in ``run``, on the model and at the hook its config
    names (``model`` overrides the model)."""
    from switchsae.saes.io import load_sae
    from switchsae.sources.models import load_model

    sae = load_sae(run)
    check_settings(sae, settings)
    model_name = model or sae.cfg.model_name
    if not model_name:
        raise ValueError(f"The SAE in {run} names no model; pass one with --model.")
    if not sae.cfg.hook_name:
        raise ValueError(f"The SAE in {run} names no hook point; it cannot be steered.")
    hook = HookPoint.parse(sae.cfg.hook_name)
    lm, tokenizer = load_model(model_name)
    return steer_model(sae, lm, tokenizer, hook, prompt, settings)
