"""PROMETHEUS_MULTIPROC_DIR for `serve --workers N`, prepared before anything imports prometheus-client's values
(which open their files in that directory at import), so this module imports none of it."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# prometheus-client's own files (counter_123.db, gauge_livesum_123.db, histogram_123.db, ...): nothing else in the
# directory is ever removed, whatever else an operator keeps there.
VALUE_FILE = re.compile(r"(counter|histogram|summary|gauge_[a-z]+)_\d+\.db")


class MetricsDirError(RuntimeError):
    """PROMETHEUS_MULTIPROC_DIR cannot be used; the message says why."""


def prepare(workers: int) -> str | None:
    """For N > 1 gateway processes (or a directory the operator set): a directory for every process's values,
    emptied of an earlier run's. Returns the directory to remove at exit when it was made here."""
    given = os.environ.get(MULTIPROC_ENV)
    if workers <= 1 and not given:
        return None
    if not given:
        made = os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="policy-relay-metrics-")
        return made
    folder = Path(given)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"not writable: {folder}")
        for stale in folder.iterdir():
            if VALUE_FILE.fullmatch(stale.name):
                stale.unlink(missing_ok=True)
    except OSError as exc:
        raise MetricsDirError(f"{MULTIPROC_ENV}={given} cannot hold the metrics of the gateway processes ({exc}); "
                              "point it at a writable directory of its own, or unset it.") from exc
    return None


def remove(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


def dead_processes(folder: str) -> set[int]:
    """Pids that left value files behind and no longer run (a worker killed without a clean shutdown)."""
    pids = {int(m.group(0).rsplit("_", 1)[1][:-3]) for name in os.listdir(folder)
            if (m := VALUE_FILE.fullmatch(name)) and name.startswith("gauge_live")}
    return {pid for pid in pids if not _alive(pid)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
