"""Serving: Ray Serve against a bare uvicorn server running the very same request path.

Both sides run `serving.app.build_app(Predictor(...))`: the same code, the same Redis, the same
champion booster from MLflow. The bare one (`python -m serving.bare`) is started here; Serve is
the app `make demo` deployed. wrk, in its own process on loopback, drives each at 1, 8 and 32
connections for `--seconds`, in `--rounds` interleaved rounds (a noisy neighbour slows both
alike), and each figure is the median over the rounds. Prints p50/p99 latency, throughput and
errors per side, the ratios Serve/bare and whether the goals hold (sequential p99 <= 1.5x bare,
peak throughput >= 0.7x bare, zero errors); then where one sequential request's time goes.

A third target is NGINX in front of the same Serve app, started here from
infra/nginx/nginx.conf.template (`make nginx` installs it) with the per-client rate limit raised
out of the way (wrk is one client): what NGINX adds to Serve's latency and throughput.

`--variants` (make bench-serving-variants): the candidates of benchmarks/README.md, each deployed
as a second Serve app under its own route prefix beside the demo's app, one at a time, and run
against it in interleaved rounds: Serve's access log on, @serve.batch at two sizes, and two
replicas.

`--soak SECONDS` (make soak-serving): first a short run at 8 connections for the peak, then an
open-loop load at half that rate for SECONDS; prints errors and p99 against the short run's.

Needs a running stack with a deployed model (`make demo` leaves one) and wrk (`make wrk`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx

# Run as a script, sys.path[0] is benchmarks/, whose serving.py would shadow the serving package.
ROOT = Path(__file__).resolve().parent.parent
if sys.path[0] == str(ROOT / "benchmarks"):
    sys.path[0] = str(ROOT)

from benchmarks import report  # noqa: E402
from benchmarks.report import (  # noqa: E402
    CpuClock,
    busiest_since,
    busiest_text,
    children_cpu,
    process_cpu,
    steal_since,
    steal_text,
)
from easymlops import nginx  # noqa: E402
from easymlops.demo import sample_requests  # noqa: E402
from easymlops.services.ray import haproxy_replica_connections  # noqa: E402
from easymlops.settings import Settings, get_settings  # noqa: E402
from easymlops.stack import free_port  # noqa: E402

WRK_SCRIPT = ROOT / "benchmarks" / "wrk_predict.lua"
CONNECTIONS = (1, 8, 32)
RESULT = re.compile(r"WRK_RESULT (.*)")


@dataclass(frozen=True)
class Load:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def wrk(url: str, connections: int, seconds: float, bodies: str, api_key: str) -> Load:
    """One wrk run (bodies: a JSON-lines file to POST in turn, or "-" for GETs)."""
    threads = min(connections, 2)
    out = subprocess.run(
        [
            *("wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s"),
            *("-s", str(WRK_SCRIPT), url, "--", bodies, api_key),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = RESULT.search(out)
    if match is None:
        raise RuntimeError(f"wrk printed no result for {url}:\n{out}")
    fields = {k: int(v) for k, v in (pair.split("=") for pair in match.group(1).split())}
    errors = sum(fields[k] for k in ("non2xx", "connect", "read", "write", "timeout"))
    return Load(
        requests=fields["requests"],
        seconds=fields["duration_us"] / 1e6,
        p50_ms=fields["p50_us"] / 1000,
        p99_ms=fields["p99_us"] / 1000,
        errors=errors,
    )


def median_load(loads: list[Load]) -> Load:
    return Load(
        requests=int(statistics.median(x.requests for x in loads)),
        seconds=statistics.median(x.seconds for x in loads),
        p50_ms=statistics.median(x.p50_ms for x in loads),
        p99_ms=statistics.median(x.p99_ms for x in loads),
        errors=sum(x.errors for x in loads),
    )


def _start(
    argv: list[str], name: str, ready_url: str, settings: Settings
) -> subprocess.Popen[bytes]:
    """Run `argv` from the repo root, returned once `ready_url` answers 200."""
    log = open(Path(tempfile.gettempdir()) / f"easymlops-bench-{name}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited ({process.returncode}); see {log.name}")
        try:
            if httpx.get(ready_url, headers=settings.serve_headers, timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise TimeoutError(f"{name} was not ready in 180 s; see {log.name}")


def start_bare(settings: Settings, port: int) -> subprocess.Popen[bytes]:
    """The bare server on `port`: the same app under plain uvicorn."""
    argv = [sys.executable, "-m", "serving.bare", "--port", str(port)]
    return _start(argv, "bare", f"http://{settings.host}:{port}/readyz", settings)


def start_nginx(settings: Settings, port: int) -> subprocess.Popen[bytes]:
    """NGINX on `port` in front of Serve, as `up --with-nginx` runs it, but with the rate
    limit out of reach: on loopback wrk is one client, and 429s would measure the limit."""
    fronted = settings.model_copy(
        update={
            "nginx_port": port,
            "nginx_rate_per_second": 10_000_000,
            "nginx_rate_burst": 10_000_000,
        }
    )
    home = Path(tempfile.mkdtemp(prefix="easymlops-bench-nginx-"))
    argv = nginx.prepare(fronted, home, home / "access.log")
    return _start(argv, "nginx", f"{nginx.url(fronted)}/readyz", settings)


def breakdown(
    settings: Settings, bodies: list[dict[str, object]], n: int = 1000
) -> dict[str, float]:
    """Median milliseconds of the parts of one /predict inside one process: the same Predictor
    and app, the app called as ASGI directly (no HTTP server, no client in between)."""
    from serving.app import Predictor, build_app
    from serving.features import to_matrix
    from serving.model import ServingConfig
    from serving.schemas import PredictRequest

    predictor = Predictor(ServingConfig.from_settings(settings), "breakdown")
    requests = [PredictRequest.model_validate(body) for body in bodies]
    app = build_app(predictor)
    encoded = [json.dumps(body).encode() for body in bodies]
    headers = [(b"content-type", b"application/json")]
    if settings.serve_headers:
        headers.append((b"authorization", settings.serve_headers["Authorization"].encode()))

    async def asgi_post(body: bytes) -> None:
        scope = predict_scope(body, headers)
        status = 0

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, object]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])  # type: ignore[call-overload]

        await app(scope, receive, send)
        if status != 200:
            raise RuntimeError(f"in-process /predict answered {status}")

    async def median_ms(call: Callable[[int], Awaitable[object]]) -> float:
        times = []
        for i in range(n):
            started = time.perf_counter()
            await call(i)
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    async def measure() -> dict[str, float]:
        model = predictor.watcher.model
        assert model is not None
        rows = [await predictor._fetch([req], datetime.now(UTC)) for req in requests]
        await median_ms(lambda i: asgi_post(encoded[i % len(encoded)]))  # warm-up

        async def inference(i: int) -> object:
            return model.predict(to_matrix(rows[i % len(rows)]))

        fetch = await median_ms(
            lambda i: predictor._fetch([requests[i % len(requests)]], datetime.now(UTC))
        )
        infer = await median_ms(inference)
        score = await median_ms(lambda i: predictor.score([requests[i % len(requests)]]))
        whole = await median_ms(lambda i: asgi_post(encoded[i % len(encoded)]))
        return {
            "feature fetch (Redis, session features)": fetch,
            "model (XGBoost inplace_predict)": infer,
            "response, prediction log, spans": score - fetch - infer,
            "middleware, routing, validation, JSON": whole - score,
        }

    try:
        return asyncio.run(measure())
    finally:
        predictor.close()


def predict_scope(body: bytes, headers: list[tuple[bytes, bytes]]) -> dict[str, object]:
    """The ASGI scope a server would give the app for `POST /predict` of `body`."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "root_path": "",
        "query_string": b"",
        "headers": [*headers, (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--soak", type=float, default=0.0, help="soak for this many seconds")
    parser.add_argument(
        "--stall", type=float, default=0.0, help="stop the replica this many seconds under load"
    )
    parser.add_argument("--variants", action="store_true", help="Serve configurations vs the app")
    report.add_arguments(parser)  # --json: the default mode's figures only
    args = parser.parse_args()
    report.apply_quick(parser, args, seconds=4.0, rounds=2)
    if shutil.which("wrk") is None:
        print("wrk is not installed: run `make wrk`", file=sys.stderr)
        return 1
    settings = get_settings()
    bodies = sample_requests(settings, 200)
    if not bodies:
        print("no test-split cart events in the warehouse: run `make demo` first", file=sys.stderr)
        return 1
    ready = httpx.get(f"{settings.serve_url}/readyz", headers=settings.serve_headers, timeout=10)
    if ready.status_code != 200:
        print(f"serving is not ready ({ready.status_code}): {ready.text}", file=sys.stderr)
        return 1
    key = settings.serve_api_key.get_secret_value()
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as handle:
        handle.write("\n".join(json.dumps(body) for body in bodies))
        bodies_file = handle.name
    if args.soak:
        return soak(settings, bodies, bodies_file, key, args.soak)
    if args.stall:
        return stall(settings, bodies, bodies_file, key, args.stall)
    if args.variants:
        return variants(settings, bodies_file, key, args.seconds, args.rounds)

    bare_port, nginx_port = free_port(settings.host), free_port(settings.host)
    bare = start_bare(settings, bare_port)
    try:
        front = start_nginx(settings, nginx_port)
    except (nginx.NginxError, RuntimeError, TimeoutError):
        bare.terminate()
        raise
    targets = {
        "serve": settings.serve_url,
        "bare": f"http://{settings.host}:{bare_port}",
        "nginx": f"http://{settings.host}:{nginx_port}",
    }
    print(
        f"Ray Serve {targets['serve']} vs bare uvicorn {targets['bare']} (same app, same "
        f"Redis, same booster), and NGINX {targets['nginx']} in front of Serve; wrk "
        f"{args.seconds:g} s x {args.rounds} rounds, {os.cpu_count()} cores, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    cpu_before = CpuClock.read()
    try:
        for target in targets.values():  # warm both (connections, caches, JIT-free but lazy)
            wrk(f"{target}/predict", 8, 2, bodies_file, key)
        results: dict[tuple[str, int], list[Load]] = {}
        floors: dict[str, list[Load]] = {}
        for round_ in range(args.rounds):
            order = list(targets.items())[round_ % 3 :] + list(targets.items())[: round_ % 3]
            for name, target in order:
                floors.setdefault(name, []).append(
                    wrk(f"{target}/healthz", 1, args.seconds / 2, "-", key)
                )
                for c in CONNECTIONS:
                    results.setdefault((name, c), []).append(
                        wrk(f"{target}/predict", c, args.seconds, bodies_file, key)
                    )
        parts = breakdown(settings, bodies)
    finally:
        for process in (bare, front):
            process.terminate()
            process.wait(30)
        os.unlink(bodies_file)
    figures = print_report(
        {k: median_load(v) for k, v in results.items()},
        {k: median_load(v) for k, v in floors.items()},
        parts,
    )
    stolen = steal_since(cpu_before)
    # Serve and bare alternate within each round, so a steal burst hits one side's p99 only.
    print(f"during the run: {steal_text(stolen)} (a burst stalls whichever side runs then)")
    report.write(args.json, "serving", figures, quick=args.quick)
    return 0


def print_report(
    results: dict[tuple[str, int], Load], floors: dict[str, Load], parts: dict[str, float]
) -> list[report.Figure]:
    print(f"\n{'':<14}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'errors':>8}")
    for c in CONNECTIONS:
        for name in ("serve", "bare", "nginx"):
            r = results[(name, c)]
            print(
                f"{name + f' c={c}':<14}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.rps:>9.0f}{r.errors:>8}"
            )
        s, b, n = results[("serve", c)], results[("bare", c)], results[("nginx", c)]
        for label, x, y in (("serve/bare", s, b), ("nginx/serve", n, s)):
            print(
                f"{label:<14}{x.p50_ms / y.p50_ms:>8.2f}x{x.p99_ms / y.p99_ms:>8.2f}x"
                f"{x.rps / y.rps:>8.2f}x"
            )
    for name, floor in floors.items():
        print(f"GET /healthz {name}: p50 {floor.p50_ms:.2f} ms, p99 {floor.p99_ms:.2f} ms")
    serve_peak = max(results[("serve", c)].rps for c in CONNECTIONS)
    errors = sum(r.errors for r in results.values())
    bare_peak = max(results[("bare", c)].rps for c in CONNECTIONS)
    figures = [
        report.Figure(
            "sequential /predict p99 through Ray Serve (c=1)",
            results[("serve", 1)].p99_ms,
            "ms",
            report.Baseline("bare uvicorn, same app", results[("bare", 1)].p99_ms),
            goal=report.Goal("ratio", "<=", 1.5),
        ),
        report.Figure(
            "sequential /predict p50 through Ray Serve (c=1)",
            results[("serve", 1)].p50_ms,
            "ms",
            report.Baseline("bare uvicorn, same app", results[("bare", 1)].p50_ms),
        ),
        report.Figure(
            f"peak /predict throughput through Ray Serve (c={'/'.join(map(str, CONNECTIONS))})",
            serve_peak,
            "req/s",
            report.Baseline("bare uvicorn, same app", bare_peak),
            goal=report.Goal("ratio", ">=", 0.7),
        ),
        report.Figure(
            "errors, all targets and rounds", errors, "", goal=report.Goal("value", "<=", 0)
        ),
        report.Figure(
            "sequential /predict p50 with NGINX in front of Serve",
            results[("nginx", 1)].p50_ms,
            "ms",
            report.Baseline("Ray Serve directly", results[("serve", 1)].p50_ms),
        ),
    ]
    print()
    for figure in figures:
        if figure.goal is not None:
            measured = f"{figure.value:g}" + (
                "" if figure.ratio is None else f", ratio {figure.ratio:.2f}x"
            )
            print(
                f"goal {'met' if figure.goal_met else 'MISSED'}: {figure.name}: "
                f"{figure.goal.text(figure.unit)} ({measured})"
            )
    seq_serve, seq_bare = results[("serve", 1)].p50_ms, results[("bare", 1)].p50_ms
    in_process = sum(parts.values())
    print("\nWhere one sequential /predict's time goes (p50, ms):")
    for name, ms in parts.items():
        print(f"  {name:<42}{ms:>7.2f}  (in process, median)")
    print(f"  {'HTTP server + loopback + client (bare)':<42}{seq_bare - in_process:>7.2f}")
    print(f"  {'Serve ingress (HAProxy + replica server)':<42}{seq_serve - seq_bare:>7.2f}")
    print(f"  {'total through Serve':<42}{seq_serve:>7.2f}")
    seq_nginx = results[("nginx", 1)]
    print(
        f"  {'NGINX in front adds':<42}{seq_nginx.p50_ms - seq_serve:>7.2f}"
        f"  (p99 +{seq_nginx.p99_ms - results[('serve', 1)].p99_ms:.2f})"
    )
    return figures


@dataclass(frozen=True)
class Variant:
    name: str
    settings: dict[str, object]  # Settings fields that differ from the demo's app
    replicas: int = 1
    access_log: bool = False


VARIANTS = (
    Variant("Serve's access log on", {}, access_log=True),
    Variant("@serve.batch 8, 1 ms", {"serve_batch_max_size": 8, "serve_batch_wait_ms": 1.0}),
    Variant("@serve.batch 32, 5 ms", {"serve_batch_max_size": 32, "serve_batch_wait_ms": 5.0}),
    Variant("2 replicas", {}, replicas=2),
)


def variants(settings: Settings, bodies_file: str, key: str, seconds: float, rounds: int) -> int:
    """Each variant against the demo's app (same head, same Redis, same booster), at c=1/8/32."""
    from serving.deploy import deploy, undeploy

    print(
        f"Serve variants vs the app `make demo` deployed; wrk {seconds:g} s x {rounds} rounds, "
        f"{os.cpu_count()} cores, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    print(f"\n{'':<26}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'errors':>8}")
    for variant in VARIANTS:
        prefix = "/variant"
        # CPUs reserved per replica only place replicas; 0.25 leaves room beside the app.
        url = deploy(
            settings.model_copy(update=variant.settings),
            app_name="bench-variant",
            route_prefix=prefix,
            replicas=variant.replicas,
            access_log=variant.access_log,
            num_cpus=0.25,
            timeout=240,
        )
        targets = {"app": f"{settings.serve_url}/predict", variant.name: f"{url}/predict"}
        try:
            for target in targets.values():
                wrk(target, 8, 2, bodies_file, key)
            results: dict[tuple[str, int], list[Load]] = {}
            for round_ in range(rounds):
                order = list(targets.items())
                for name, target in order if round_ % 2 == 0 else order[::-1]:
                    for c in CONNECTIONS:
                        results.setdefault((name, c), []).append(
                            wrk(target, c, seconds, bodies_file, key)
                        )
        finally:
            undeploy(settings, app_name="bench-variant")
        for c in CONNECTIONS:
            app, other = median_load(results[("app", c)]), median_load(results[(variant.name, c)])
            for name, r in (("app", app), (variant.name, other)):
                label = f"{name} c={c}"
                print(f"{label:<26}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.rps:>9.0f}{r.errors:>8}")
            print(
                f"{'variant/app':<26}{other.p50_ms / app.p50_ms:>8.2f}x"
                f"{other.p99_ms / app.p99_ms:>8.2f}x{other.rps / app.rps:>8.2f}x"
            )
    os.unlink(bodies_file)
    return 0


@dataclass(frozen=True)
class Attack:
    """What vegeta reports of a constant-rate run."""

    requests: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    failed: int  # requests without a 200 (status 0: no answer at all)
    causes: list[str]  # the status codes seen and vegeta's distinct error texts
    steal_share: float | None  # of the machine's CPU time, taken by the hypervisor meanwhile


def vegeta_binary() -> str:
    found = shutil.which("vegeta") or str(ROOT / ".tools" / "vegeta")
    if not os.access(found, os.X_OK):
        raise SystemExit("vegeta is not installed: run `make vegeta` (go install, into .tools/)")
    return found


def attack(
    url: str, rate: float, seconds: float, bodies: list[dict[str, object]], headers: dict[str, str]
) -> Attack:
    """vegeta at a constant `rate` for `seconds`, open loop: requests go out on schedule however
    slow the answers, so a slow server cannot slow the load down (a Python client could not
    keep 160 req/s on schedule next to the server on 2 cores). Results go to a file per
    minute; between them each minute's p99 is printed beside the CPU time the hypervisor stole
    in it, because on the shared VMs here the long run's tail follows the steal bursts, and
    the processes that used the most CPU in it (a tail without steal: who took the cores)."""
    header = {"Content-Type": ["application/json"]} | {k: [v] for k, v in headers.items()}
    work = Path(tempfile.mkdtemp(prefix="easymlops-soak-"))
    targets = work / "targets.jsonl"
    targets.write_text(
        "\n".join(
            json.dumps(
                {
                    "method": "POST",
                    "url": url,
                    "header": header,
                    "body": base64.b64encode(json.dumps(body).encode()).decode(),
                }
            )
            for body in bodies
        )
    )
    binary, results, done = vegeta_binary(), [], 0.0
    first = CpuClock.read()
    while done < seconds:
        chunk = min(60.0, seconds - done)
        result = work / f"{len(results)}.bin"
        before, processes, load_before = CpuClock.read(), process_cpu(), children_cpu()
        subprocess.run(
            [
                *(binary, "attack", "-format=json", f"-targets={targets}", f"-rate={rate:.0f}/1s"),
                *(f"-duration={chunk:g}s", "-timeout=10s", f"-output={result}"),
            ],
            check=True,
        )
        results.append(str(result))
        done += chunk
        if seconds > 60:
            # vegeta has exited (and left /proc) by now: its CPU comes from RUSAGE_CHILDREN.
            load = {"vegeta (the load)": children_cpu() - load_before}
            steal, busiest = steal_since(before), busiest_since(processes, count=4, ended=load)
            minute = _vegeta_report(binary, [str(result)])
            p99 = minute["latencies"]["99th"] / 1e6
            refused = _not_ok(minute)
            errors = f"{sum(refused.values())} errors" + (f" {refused}" if refused else "")
            print(
                f"  {done:.0f}/{seconds:.0f} s: p99 {p99:.2f} ms, {errors}, {steal_text(steal)}; "
                f"CPU: {busiest_text(busiest)}",
                flush=True,
            )
    stolen = steal_since(first)
    summary = _vegeta_report(binary, results)
    shutil.rmtree(work)
    not_ok = _not_ok(summary)
    latencies = summary["latencies"]
    return Attack(
        requests=summary["requests"],
        p50_ms=latencies["50th"] / 1e6,
        p99_ms=latencies["99th"] / 1e6,
        max_ms=latencies["max"] / 1e6,
        failed=sum(not_ok.values()),
        causes=[f"{n} x status {code}" for code, n in not_ok.items()]
        + list(summary.get("errors") or []),
        steal_share=stolen,
    )


def _not_ok(report: dict[str, Any]) -> dict[str, int]:
    """Responses by status other than 200 in a vegeta report ("0": no response, e.g. a
    timeout; "503": shed or the online store down)."""
    return {code: n for code, n in report["status_codes"].items() if code != "200"}


def _vegeta_report(binary: str, results: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [binary, "report", "-type=json", *results], capture_output=True, text=True, check=True
    )
    return cast(dict[str, Any], json.loads(done.stdout))


@dataclass(frozen=True)
class GcPauses:
    """The replica's garbage collections by generation, as its /metrics histogram has them:
    count, total seconds and the cumulative count under each bucket bound."""

    count: dict[str, float]
    total_s: dict[str, float]
    buckets: dict[str, dict[float, float]]

    @classmethod
    def scrape(cls, settings: Settings) -> GcPauses:
        response = httpx.get(
            f"{settings.serve_url}/metrics", headers=settings.serve_headers, timeout=10
        )
        response.raise_for_status()
        return cls.parse(response.text)

    @classmethod
    def parse(cls, metrics_text: str) -> GcPauses:
        from prometheus_client.parser import text_string_to_metric_families

        count: dict[str, float] = {}
        total: dict[str, float] = {}
        buckets: dict[str, dict[float, float]] = {}
        for family in text_string_to_metric_families(metrics_text):
            if family.name != "easymlops_serving_gc_pause_seconds":
                continue
            for sample in family.samples:
                gen = sample.labels["generation"]
                if sample.name.endswith("_count"):
                    count[gen] = sample.value
                elif sample.name.endswith("_sum"):
                    total[gen] = sample.value
                elif sample.name.endswith("_bucket"):
                    buckets.setdefault(gen, {})[float(sample.labels["le"])] = sample.value
        return cls(count, total, buckets)

    def since(self, before: GcPauses) -> str:
        """Per generation: collections since `before`, their mean pause, and the bucket bounds
        the median and the longest stayed under (a pause includes any time the process was
        descheduled meanwhile, so steal shows in the mean and the longest)."""
        parts = []
        for gen in sorted(self.count):
            n = self.count[gen] - before.count.get(gen, 0.0)
            if n <= 0:
                parts.append(f"gen{gen} none")
                continue
            mean_ms = (self.total_s[gen] - before.total_s.get(gen, 0.0)) / n * 1000
            earlier = before.buckets.get(gen, {})
            new = {le: c - earlier.get(le, 0.0) for le, c in self.buckets[gen].items()}
            median, longest = (
                min(le for le, c in new.items() if c >= share * n) for share in (0.5, 1.0)
            )
            parts.append(
                f"gen{gen} {n:.0f} x mean {mean_ms:.2f} ms "
                f"(median {_bound_text(median)}, longest {_bound_text(longest)})"
            )
        return "replica GC pauses: " + "; ".join(parts)


def _bound_text(bound: float) -> str:
    return "above every bucket" if bound == float("inf") else f"<= {bound * 1000:g} ms"


def half_the_peak(settings: Settings, bodies_file: str, key: str) -> tuple[Load, float]:
    """wrk's peak at 8 connections for 10 s, and half of it: the open-loop rate of the soak
    and the stall (the bodies file is used up)."""
    short = wrk(f"{settings.serve_url}/predict", 8, 10, bodies_file, key)
    os.unlink(bodies_file)
    return short, short.rps / 2


def soak(
    settings: Settings, bodies: list[dict[str, object]], bodies_file: str, key: str, seconds: float
) -> int:
    short, rate = half_the_peak(settings, bodies_file, key)
    url, headers = f"{settings.serve_url}/predict", settings.serve_headers
    print(
        f"short run: {short.rps:.0f} req/s at 8 connections (wrk); vegeta at half that, "
        f"{rate:.0f} req/s, open loop: 20 s, then {seconds:.0f} s"
    )
    base = attack(url, rate, 20, bodies, headers)
    print(
        f"20 s: {base.requests} requests, p50 {base.p50_ms:.2f} ms, p99 {base.p99_ms:.2f} ms, "
        f"{steal_text(base.steal_share)}"
    )
    gc_before = GcPauses.scrape(settings)
    long = attack(url, rate, seconds, bodies, headers)
    print(GcPauses.scrape(settings).since(gc_before))
    print(
        f"soak {seconds:.0f} s: {long.requests} requests, p50 {long.p50_ms:.2f} ms, p99 "
        f"{long.p99_ms:.2f} ms = {long.p99_ms / base.p99_ms:.2f}x the 20 s run, "
        f"{steal_text(long.steal_share)}"
    )
    for run in (base, long):
        for cause in run.causes:
            print(f"  error: {cause}")
    errors = base.failed + long.failed
    ok = errors == 0 and long.p99_ms <= 2 * base.p99_ms
    print(f"goal {'met' if ok else 'MISSED'}: zero errors ({errors}) and p99 within 2x of 20 s")
    return 0 if ok else 1


def stall(
    settings: Settings, bodies: list[dict[str, object]], bodies_file: str, key: str, pause: float
) -> int:
    """The soak's load (vegeta at half of wrk's peak) while the replica is stopped (SIGSTOP)
    for `pause` seconds, as a burst of CPU steal or a long pause would stop it: what clients
    saw, how many connections piled up at the replica meanwhile, and how long after it resumed
    that backlog took to clear. Reproduces in half a minute what the soak meets under steal."""
    from serving.deploy import replica_pids

    short, rate = half_the_peak(settings, bodies_file, key)
    lead, tail = 8.0, 20.0
    (pid,) = replica_pids(settings)
    held: list[tuple[float, int]] = []  # (seconds since the start, connections at the replica)
    resumed: list[float] = []
    started = time.monotonic()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            held.append((time.monotonic() - started, haproxy_replica_connections(settings)))
            time.sleep(0.2)

    def stop_and_resume() -> None:
        time.sleep(lead)
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(pause)
        finally:
            os.kill(pid, signal.SIGCONT)
            resumed.append(time.monotonic() - started)

    print(
        f"short run: {short.rps:.0f} req/s at 8 connections (wrk); vegeta at {rate:.0f} req/s "
        f"for {lead + pause + tail:.0f} s, the replica (pid {pid}) stopped for {pause:g} s "
        f"after {lead:g} s"
    )
    threads = [threading.Thread(target=f, daemon=True) for f in (sample, stop_and_resume)]
    for thread in threads:
        thread.start()
    try:
        run = attack(
            f"{settings.serve_url}/predict",
            rate,
            lead + pause + tail,
            bodies,
            settings.serve_headers,
        )
    finally:
        done.set()
        for thread in threads:
            thread.join()
    before = max((n for t, n in held if t < lead), default=0)
    peak = max(n for _t, n in held)
    cleared = next((t for t, n in held if t > resumed[0] and n <= before), None)
    print(
        f"{run.requests} requests: p50 {run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms, longest "
        f"{run.max_ms:.0f} ms; {run.failed} errors{' ' + str(run.causes) if run.failed else ''}; "
        f"{steal_text(run.steal_share)}"
    )
    print(
        f"connections at the replica: at most {before} before the stop, {peak} at the peak "
        f"(about {pause:g} s x {rate:.0f} req/s = {pause * rate:.0f}); "
        + (
            f"back to {before} {cleared - resumed[0]:.1f} s after it resumed"
            if cleared is not None
            else f"still above {before} at the end, {tail:g} s after it resumed"
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
