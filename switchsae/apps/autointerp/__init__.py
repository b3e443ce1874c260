"""Automated interpretation of SAE latents (``switchsae autointerp``): an LLM explains each sampled
latent from its top-activating and interval-sampled contexts, then scores its own explanation by
detection and fuzzing; balanced accuracy per latent, the mean with a 95% confidence interval.

    config.py    the settings (flags)                 examples.py  the sample and what the LLM is shown
    prompts.py   requests and how replies are read    score.py     one latent explained and scored
    client.py    the openai client, retries           server.py    the offline default LLM server process
    stats.py     balanced accuracy, t intervals       store.py     the output folder (audit, resume)
    run.py       the command, end to end
"""
