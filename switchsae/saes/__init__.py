"""SAE architectures behind one interface, and the one registry the CLI reads its choices from."""
from __future__ import annotations

from switchsae.config import SAEConfig
from switchsae.saes.base import Latents, SAEOutput, SparseAutoencoder
from switchsae.saes.batchtopk import BatchTopKSAE
from switchsae.saes.gated import GatedSAE
from switchsae.saes.jumprelu import JumpReLUSAE
from switchsae.saes.relu import ReLUSAE
from switchsae.saes.switch import SwitchSAE
from switchsae.saes.topk import TopKSAE

REGISTRY: dict[str, type[SparseAutoencoder]] = {
    "switch": SwitchSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "relu": ReLUSAE,
    "gated": GatedSAE,
    "jumprelu": JumpReLUSAE,
}


#: every architecture-specific setting and the architectures that read it (``specific_settings``)
SETTING_ARCHS: dict[str, tuple[str, ...]] = {
    name: tuple(arch for arch, cls in REGISTRY.items() if name in cls.specific_settings)
    for name in sorted(frozenset().union(*(cls.specific_settings for cls in REGISTRY.values())))
}


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """A freshly initialised SAE of the architecture ``cfg.arch``."""
    return REGISTRY[cfg.arch](cfg)


def reads_setting(arch: str, name: str) -> bool:
    """Whether architecture ``arch`` reads setting ``name`` (every setting not specific to some
    architectures is read by all)."""
    return arch in SETTING_ARCHS.get(name, REGISTRY)


__all__ = [
    "REGISTRY", "SETTING_ARCHS", "build_sae", "reads_setting", "Latents", "SAEOutput", "SparseAutoencoder",
    "SwitchSAE", "TopKSAE", "BatchTopKSAE", "ReLUSAE", "GatedSAE", "JumpReLUSAE",
]
