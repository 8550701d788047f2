# policy-relay gateway image. `policy-relay serve` applies the Alembic migrations itself before it starts.
FROM python:3.11-slim

# LITELLM_LOCAL_MODEL_COST_MAP: use the price map bundled with litellm instead of fetching it at import time.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True

WORKDIR /app

# Dependencies are pinned in pyproject.toml; installing the project pulls exactly those versions.
COPY . .
RUN pip install --no-cache-dir . \
    && useradd --system --create-home --home-dir /home/relay relay \
    && chown relay /app

USER relay

EXPOSE 8080

CMD ["policy-relay", "serve", "--host", "0.0.0.0", "--port", "8080"]
