"""Serving latency: sequential POST /predict through Ray Serve, against GET /healthz on the same
keep-alive connection (the HTTP + Serve proxy floor), measured in the same run.

Needs a running stack with a deployed model (`make demo` leaves one). Prints p50/p99 of both and
the ratio predict/healthz: what feature fetch + model inference add on top of the transport."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import httpx

from easymlops.demo import sample_requests
from easymlops.settings import get_settings


def timed(
    client: httpx.Client, method: str, path: str, bodies: list[dict] | None, n: int
) -> list[float]:
    latencies = []
    for i in range(n):
        started = time.perf_counter()
        if bodies is None:
            response = client.request(method, path)
        else:
            response = client.request(method, path, json=bodies[i % len(bodies)])
        latencies.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return sorted(latencies)


def p(latencies: list[float], q: float) -> float:
    return latencies[min(len(latencies) - 1, int(len(latencies) * q))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    settings = get_settings()
    bodies = sample_requests(settings, 200)
    if not bodies:
        print("no test-split cart events in the warehouse: run `make demo` first", file=sys.stderr)
        return 1
    with httpx.Client(base_url=settings.serve_url, timeout=10) as client:
        ready = client.get("/readyz")
        if ready.status_code != 200:
            print(f"serving is not ready ({ready.status_code}): {ready.text}", file=sys.stderr)
            return 1
        timed(client, "POST", "/predict", bodies, 50)  # warm-up
        # Interleave rounds so a noisy neighbour slows both sides alike.
        base: list[float] = []
        predict: list[float] = []
        for _ in range(5):
            base += timed(client, "GET", "/healthz", None, args.requests // 5)
            predict += timed(client, "POST", "/predict", bodies, args.requests // 5)
    base.sort()
    predict.sort()
    for name, values in (("baseline GET /healthz", base), ("POST /predict", predict)):
        print(f"{name:<22}  p50 {statistics.median(values):7.2f} ms  p99 {p(values, 0.99):7.2f} ms")
    print(
        f"ratio predict/healthz   p50 {statistics.median(predict) / statistics.median(base):.2f}x"
    )
    print(f"throughput (sequential) {1000 / statistics.fmean(predict):.0f} predictions/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
