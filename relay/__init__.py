"""policy-relay: an OpenAI-compatible relay with per-model sampling-parameter policies."""

import os

# litellm reads these at import time; without them every start tries the internet.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_TELEMETRY", "False")

__version__ = "0.1.0"
