"""Higgs Audio v2 through transformers: checkpoints, prompts, reference audio and the batched engine."""
