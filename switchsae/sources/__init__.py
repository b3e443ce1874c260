"""Where activations come from: corpora, language models and hook points, the on-disk cache."""
