"""The local torch/transformers worker (arrives with the worker issue)."""
