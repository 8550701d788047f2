"""A worker started by `policy-relay serve --with-worker` exits as soon as the gateway that started it is gone:
uvicorn re-raises SIGTERM after its graceful shutdown, so the gateway can die without running atexit, and an
orphaned worker would hold its model (hundreds of MB, or a GPU) for nobody."""

from __future__ import annotations

import os
import threading
import time

PARENT_ENV = "RELAY_WORKER_PARENT"  # the gateway's pid, set by the gateway when it starts a worker


def exit_with_parent() -> None:
    """In a worker started by `serve --with-worker`: exit as soon as the gateway that started it is gone."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
