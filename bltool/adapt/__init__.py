"""Adapting and compressing a student: gated LoRA, adapted checkpoints, the compression into dense / low-rank
linears and the compressed model classes."""
