"""switchsae: Switch Sparse Autoencoders and baselines on language-model activations."""
