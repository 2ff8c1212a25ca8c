"""Does the generator hold its schedule? Open loop at a high rate against an instant server.

Starts :mod:`loadtest.instant` (a minimal server that answers every request at once
with a fixed 4-token stream) in a separate process, sends ``--rate`` requests per second
for ``--seconds`` (Poisson), and prints the send lag (actual minus scheduled send)
percentiles, the achieved rate and the client's CPU. Target: p99 send lag under 10 ms at
500 requests per second.

    .venv/bin/python bench/loadtest_send_lag.py --rate 500 --seconds 10
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import click
import numpy as np

from loadtest.config import LoadTestConfig
from loadtest.metrics import compute_run_metrics
from loadtest.runner import run_load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@click.command()
@click.option("--rate", default=500.0, show_default=True)
@click.option("--seconds", default=10.0, show_default=True)
@click.option("--output-tokens", default=4, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--event-loop", type=click.Choice(["asyncio", "uvloop"]), default="asyncio", show_default=True)
def main(rate: float, seconds: float, output_tokens: int, repeats: int, event_loop: str) -> None:
    port = _free_port()
    code = (
        "import asyncio; from loadtest.instant import serve_instant\n"
        "async def main():\n"
        f"    s = await serve_instant('127.0.0.1', {port}, {output_tokens})\n"
        "    await s.serve_forever()\n"
        "asyncio.run(main())\n"
    )
    server = subprocess.Popen([sys.executable, "-c", code])
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        print(f"instant server on {url}; {os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.2f}")
        for k in range(repeats):
            cfg = LoadTestConfig.model_validate(
                {
                    "target": {"base_url": url, "model": "instant"},
                    "load": {
                        "rate": rate,
                        "num_requests": int(rate * seconds),
                        "seed": k,
                        "event_loop": event_loop,
                    },
                    "workload": {"classes": [{"input_tokens": 16, "output_tokens": output_tokens}]},
                    "output": {"progress": False},
                }
            )
            raw = run_load(cfg)
            m = compute_run_metrics(raw.records)
            lags = np.asarray([r.sent - r.scheduled for r in raw.records if r.sent is not None]) * 1e3
            v = raw.validity
            p50, p99 = np.percentile(lags, [50, 99])
            verdict = "VALID" if v.valid else "INVALID: " + "; ".join(v.reasons)
            print(
                f"{event_loop} run {k + 1}: {len(raw.records)} requests at {rate:g}/s: "
                f"send lag p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {lags.max():.2f} ms; "
                f"achieved {v.achieved_rate:.1f}/s of scheduled {v.scheduled_rate:.1f}/s; "
                f"completed {m.completed}; client CPU {v.client_cpu:.0%} of a core; {verdict}"
            )
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
