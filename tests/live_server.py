"""A real uvicorn server in a background thread, serving the app against the test database."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_asgi_server() -> Iterator[str]:
    """Serve kb.asgi:application on a free loopback port; yields the base URL.

    It runs in this process, so it uses the test database pytest-django set up; tests
    using it need `transactional_db`, so the server thread sees committed rows.
    """
    import uvicorn

    port = free_port()
    config = uvicorn.Config("kb.asgi:application", host="127.0.0.1", port=port, lifespan="off",
                            log_level="warning")
    server = uvicorn.Server(config)
    # Signal handlers can only be installed in the main thread.
    server.install_signal_handlers = lambda: None
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
