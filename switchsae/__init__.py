"""switchsae: Switch Sparse Autoencoders and baselines on language-model activations.

The public API: configs, the architectures' registry, training, evaluation, saving/loading,
activation sources and steering. Everything the ``switchsae`` command does is one of these calls.
"""
from switchsae.apps.steer import SteerConfig, SteerResult, steer
from switchsae.config import SAEConfig, TrainConfig
from switchsae.evaluate import evaluate
from switchsae.pipeline import evaluate_run
from switchsae.saes import REGISTRY, build_sae
from switchsae.saes.io import load_sae, save_sae
from switchsae.sources.activations import open_activations
from switchsae.train import train

__all__ = ["SAEConfig", "TrainConfig", "REGISTRY", "build_sae", "train", "evaluate", "evaluate_run",
           "load_sae", "save_sae", "open_activations", "steer", "SteerConfig", "SteerResult"]
