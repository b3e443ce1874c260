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


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """A freshly initialised SAE of the architecture ``cfg.arch``."""
    return REGISTRY[cfg.arch](cfg)


__all__ = [
    "REGISTRY", "build_sae", "Latents", "SAEOutput", "SparseAutoencoder",
    "SwitchSAE", "TopKSAE", "BatchTopKSAE", "ReLUSAE", "GatedSAE", "JumpReLUSAE",
]
