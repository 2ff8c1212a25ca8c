"""Run a simulated engine as a real HTTP server on a free loopback port, in a thread.

For tests and benchmarks that need a second OpenAI-compatible server (for instance an
upstream to hand requests off to) without a subprocess. The engine runs on the
thread's own event loop; :class:`~loadtest.sim.server.SimFaults` may be changed
from the caller's thread at any time.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from loadtest.sim.server import SimEngine, build_app

__all__ = ["serve_in_thread"]


@contextmanager
def serve_in_thread(engine: SimEngine, start_timeout_s: float = 10.0) -> Iterator[str]:
    """Serve ``engine``; yields its base URL (``http://127.0.0.1:PORT``), stops on exit."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(build_app(engine), log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    try:
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the simulated engine did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=start_timeout_s)
        sock.close()
