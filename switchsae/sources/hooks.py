"""Hook points inside a Hugging Face causal LM: name them, capture them, patch them.

A :class:`HookPoint` is a (layer, site) pair named the TransformerLens way,
``blocks.{layer}.hook_{site}``. Sites:

- ``resid_pre``: the residual stream entering decoder layer ``layer``;
- ``resid_post``: the residual stream leaving it;
- ``attn_out`` / ``mlp_out``: what the attention / MLP sub-block adds to the residual stream.
  For Gemma-style layers, which normalise a sub-block's output before adding it
  (``post_attention_layernorm``, ``post_feedforward_layernorm``), that is the output of the
  post-norm, since that is the tensor added to the residual stream.

Supported layouts: Llama-like (``model.layers``, incl. Mistral, Qwen, SmolLM, Gemma 1-3),
GPT-2 (``transformer.h``) and GPT-NeoX/Pythia (``gpt_neox.layers``).

:func:`capture` runs the model only up to the hooked module and stops there;
:func:`patched` replaces the hooked activation during complete forward passes.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")

# Where each architecture family keeps its decoder layers, tried in order.
_LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
                "layers", "h")
# Names of a decoder layer's attention and MLP sub-blocks across families.
_SUBLAYERS = {"attn_out": ("self_attn", "attn", "attention"), "mlp_out": ("mlp",)}
# Gemma-style layers add the output of these norms to the residual stream.
_POST_NORMS = {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"}

_NAME = re.compile(r"blocks\.(\d+)\.hook_(\w+)")


@dataclass(frozen=True)
class HookPoint:
    """One place in the model to read activations from: decoder layer ``layer``, site ``site``."""

    layer: int
    site: str

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"Unknown hook site '{self.site}'; choose one of {', '.join(SITES)}.")
        if self.layer < 0:
            raise ValueError(f"Hook layer must be a non-negative integer, got {self.layer}.")

    @property
    def name(self) -> str:
        """The TransformerLens-style name, e.g. ``blocks.10.hook_resid_post``."""
        return f"blocks.{self.layer}.hook_{self.site}"

    @classmethod
    def parse(cls, name: str) -> HookPoint:
        """Read a name such as ``blocks.10.hook_resid_post`` back into a hook point."""
        match = _NAME.fullmatch(name.strip())
        if match is None:
            raise ValueError(f"Cannot read hook name '{name}'; expected the form blocks.<layer>.hook_<site>, "
                             f"with <site> one of {', '.join(SITES)}.")
        return cls(int(match.group(1)), match.group(2))

    def __str__(self) -> str:
        return self.name


def as_hook(hook: HookPoint | str) -> HookPoint:
    """Accept a hook point or its name."""
    return hook if isinstance(hook, HookPoint) else HookPoint.parse(hook)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers, found by the attribute paths of the supported families."""
    for path in _LAYER_PATHS:
        module: object = model
        for attr in path.split("."):
            module = getattr(module, attr, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"Unsupported architecture {type(model).__name__}: no decoder layer list found "
                     f"at any of {', '.join(_LAYER_PATHS)}.")


def resolve(model: nn.Module, hook: HookPoint | str) -> tuple[nn.Module, bool]:
    """The module whose output (or, when the flag is True, whose input) is the hooked activation."""
    hook = as_hook(hook)
    layers = decoder_layers(model)
    if hook.layer >= len(layers):
        raise ValueError(f"Layer {hook.layer} is out of range for {type(model).__name__}, "
                         f"which has layers 0 to {len(layers) - 1}.")
    layer = layers[hook.layer]
    if hook.site in ("resid_pre", "resid_post"):
        return layer, hook.site == "resid_pre"
    if hasattr(layer, _POST_NORMS["mlp_out"]):
        return getattr(layer, _POST_NORMS[hook.site]), False
    for name in _SUBLAYERS[hook.site]:
        if isinstance(getattr(layer, name, None), nn.Module):
            return getattr(layer, name), False
    raise ValueError(f"Unsupported architecture {type(model).__name__}: its layers have none of the "
                     f"sub-blocks {', '.join(_SUBLAYERS[hook.site])} needed for {hook.site}.")


@contextmanager
def _hooked(module: nn.Module, on_input: bool, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Route the hooked activation through ``fn`` (its return value replaces it) while inside."""
    if on_input:
        def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def post_hook(_mod: nn.Module, _args: tuple, output: Tensor | tuple) -> Tensor | tuple:
            if isinstance(output, tuple):
                return (fn(output[0]), *output[1:])
            return fn(output)
        handle = module.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised from a hook to end the forward pass once the wanted activation is in hand."""

    def __init__(self, activation: Tensor):
        super().__init__()
        self.activation = activation


def _stop(activation: Tensor) -> Tensor:
    raise _StopForward(activation)


def capture(model: nn.Module, hook: HookPoint | str, input_ids: Tensor,
            attention_mask: Tensor | None = None) -> Tensor:
    """The ``[batch, seq, d_model]`` activation at ``hook``, on the model's device; later layers never run."""
    module, on_input = resolve(model, hook)
    device = next(model.parameters()).device
    mask = None if attention_mask is None else attention_mask.to(device)
    with torch.inference_mode(), _hooked(module, on_input, _stop):
        try:
            model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False)
        except _StopForward as stop:
            return stop.activation
    raise ValueError(f"The forward pass of {type(model).__name__} never reached hook {as_hook(hook).name}.")


@contextmanager
def patched(model: nn.Module, hook: HookPoint | str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Inside the block, every forward pass uses ``fn(act)`` in place of the activation at ``hook``."""
    module, on_input = resolve(model, hook)
    with _hooked(module, on_input, fn):
        yield
