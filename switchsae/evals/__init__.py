"""Interpretability evaluations of trained SAEs (SAEBench's definitions): sparse probing on labelled
documents (:mod:`switchsae.evals.probing`) and first-letter feature absorption
(:mod:`switchsae.evals.absorption`), with the torch logistic regression both use
(:mod:`switchsae.evals.logistic`)."""
