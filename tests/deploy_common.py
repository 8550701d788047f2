"""What the deploy/ tests share: the paths, the console-script lookup, YAML loading, and the metrics the Grafana
dashboard may use (DASHBOARD_METRICS, which tests/test_metrics.py cross-checks against the real /metrics output).

Not a test module (no `test_` prefix): tests/test_deploy_kubernetes.py and tests/test_deploy_monitoring.py import it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

# The metrics the gateway and the worker export, with their type and (where fixed) their labels; the dashboard may
# use only these, and uses each of them. Whoever changes /metrics changes this list, and the dashboard with it.
WORKER_LABELS = frozenset({"model"})  # every worker series names the one model its process serves
DASHBOARD_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "relay_requests_total": ("counter", frozenset({"endpoint", "model", "channel", "status_class", "cache"})),
    "relay_request_duration_seconds": ("histogram", frozenset({"endpoint", "model"})),
    "relay_upstream_duration_seconds": ("histogram", frozenset({"channel"})),
    "relay_time_to_first_byte_seconds": ("histogram", frozenset({"endpoint", "model"})),
    "relay_prompt_tokens_total": ("counter", frozenset({"model", "channel"})),
    "relay_completion_tokens_total": ("counter", frozenset({"model", "channel"})),
    "relay_policy_rewrites_total": ("counter", frozenset({"model", "param", "rule"})),
    "relay_cache_requests_total": ("counter", frozenset({"result"})),
    "relay_refusals_total": ("counter", frozenset({"reason"})),
    "relay_failovers_total": ("counter", frozenset({"channel"})),
    "relay_channel_circuit_open": ("gauge", frozenset({"channel"})),
    "relay_redis_up": ("gauge", frozenset()),
    "relay_database_up": ("gauge", frozenset()),
    "relay_requests_in_flight": ("gauge", frozenset()),
    "relay_event_loop_lag_seconds": ("histogram", frozenset()),
    "relay_event_loop_busy_ratio": ("gauge", frozenset({"pid"})),
    "relay_shed_requests_total": ("counter", frozenset({"reason"})),
    "relay_requests_waiting": ("gauge", frozenset()),
    "relay_start_rate_limit": ("gauge", frozenset({"pid"})),
    "relay_inflight_limit": ("gauge", frozenset()),
    "worker_num_requests_running": ("gauge", WORKER_LABELS),
    "worker_num_requests_waiting": ("gauge", WORKER_LABELS),
    "worker_batch_size": ("histogram", WORKER_LABELS),
    "worker_generation_tokens_total": ("counter", WORKER_LABELS),
    "worker_prompt_tokens_total": ("counter", WORKER_LABELS),
    "worker_time_to_first_token_seconds": ("histogram", WORKER_LABELS),
    "worker_inter_token_latency_seconds": ("histogram", WORKER_LABELS),
    "worker_kv_cache_tokens": ("gauge", WORKER_LABELS),
    "worker_nonfinite_logit_rows_total": ("counter", WORKER_LABELS),
}


def console_script(name: str) -> str | None:
    """The console script installed next to the interpreter running the tests, not whatever is first on PATH."""
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return str(exe)
    return shutil.which(name, path=str(Path(sys.executable).parent))


def load_yaml(path: Path) -> Any:
    """The one YAML document in a file."""
    return yaml.safe_load(path.read_text())


def load_yaml_documents(path: Path) -> list[Any]:
    """Every non-empty YAML document in a file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
