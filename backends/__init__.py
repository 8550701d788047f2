"""The local torch/transformers worker: its own OpenAI-compatible server (backends.server) around a batching
engine (backends.engine) with a sampler that cannot crash (backends.sampler). It stands alone: it imports
nothing of the gateway (relay/, channels/, admin/) and installs with the `worker` extra only. backends.wire
is the OpenAI protocol it shares with the gateway."""
