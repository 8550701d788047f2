"""The worker's command line: `python -m backends --model MODEL` (also `policy-relay worker`, which delegates
here). It needs only the worker's own dependencies."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="tiny-qwen2 | tiny-qwen3 | smollm2-135m | a HuggingFace id | a folder | a .gguf file; "
                             "or an embedding model (serves /v1/embeddings): all-minilm-l6-v2 | a "
                             "sentence-transformers folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bfloat16 on CUDA, float32 on CPU; float32 for an embedding model), float16, ...")
    parser.add_argument("--max-batch", type=int, default=32,
                        help="sequences decoded together (an embedding model: inputs per forward)")
    parser.add_argument("--max-waiting", type=_non_negative, default=None,
                        help="sequences (prompts x n) that may wait beside a full batch; a request that would go "
                             "beyond is refused at once with 503 `overloaded` and a Retry-After estimated from the "
                             "worker's tokens/s. 0: none wait beyond the batch (an idle worker still takes any one "
                             "request). Default: 4 x --max-batch. Generation models only")
    parser.add_argument("--max-prefill-tokens", type=int, default=None,
                        help="new prompt tokens prefilled per step; the rest wait a step, so a burst of arrivals "
                             "starts in groups and running streams keep moving (default: 96 on CPU, 2048 on CUDA)")
    parser.add_argument("--max-body-mb", type=float, default=16, help="larger request bodies are refused (413)")
    parser.add_argument("--metrics-token", default=None,
                        help="GET /metrics then needs `Authorization: Bearer <token>` (default: $WORKER_METRICS_TOKEN; "
                             "unset: /metrics is open). The environment keeps it out of `ps`")
    parser.add_argument("--log-level", default="info")


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def run(args: argparse.Namespace) -> int:
    # A worker started by a gateway inherits its environment: in prometheus-client's multiprocess mode the worker's
    # metrics would land in the gateway's directory (and its /metrics). This worker keeps its own, in memory: the
    # variable goes before anything imports prometheus_client (which reads it once, at import).
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    os.environ.pop("prometheus_multiproc_dir", None)
    args.metrics_token = args.metrics_token or os.environ.get("WORKER_METRICS_TOKEN") or None

    import uvicorn

    from backends.allocator import keep_freed_memory
    from backends.embedder import is_embedding_model
    from backends.parent import exit_with_parent

    exit_with_parent()
    keep_freed_memory()
    # The engine thread (or the embedder's forward thread) gives up the GIL in every torch op and must win it back
    # each time; while the event loop runs Python (a burst of requests to parse and render) each win can wait the
    # whole switch interval (5 ms by default), which slowed a prefill several-fold in our measurements. 1 ms keeps
    # that wait short.
    sys.setswitchinterval(0.001)
    if is_embedding_model(args.model):
        return _run_embedding(args)

    from backends.loading import load
    from backends.server import create_worker_app

    lm = load(args.model, device=args.device, dtype=args.dtype)
    logging.getLogger("backends").info("worker serving %s on %s (%s)", lm.name, lm.device, lm.dtype)
    uvicorn.run(create_worker_app(lm, max_batch=args.max_batch, max_prefill_tokens=args.max_prefill_tokens,
                                  max_body_mb=args.max_body_mb, metrics_token=args.metrics_token,
                                  max_waiting=args.max_waiting), host=args.host, port=args.port,
                log_level=args.log_level, access_log=False)
    return 0


def _run_embedding(args: argparse.Namespace) -> int:
    import uvicorn

    from backends.embedder import load_embedder
    from backends.embedding_server import create_embedding_app

    embedder = load_embedder(args.model, device=args.device, dtype=args.dtype)
    logging.getLogger("backends").info("worker serving embedding model %s on %s", embedder.name, embedder.device)
    uvicorn.run(create_embedding_app(embedder, max_batch=args.max_batch, max_body_mb=args.max_body_mb,
                                     metrics_token=args.metrics_token),
                host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backends", description="the local torch/transformers worker")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
