"""`make bench`: every benchmark in quick mode, one after another, each in a process of its own,
gathered into benchmarks/results/<UTC date>.json with the machine they ran on.

Each benchmark runs as `python benchmarks/<name>.py --quick --json <tmp>` and writes its record
(benchmarks/report.py). Its output is shown as it comes, prefixed with its name and the elapsed
time. A benchmark that fails (non-zero exit, or no record) is recorded as failed with the tail
of its output, and the others still run; the exit status is 1 if any failed.

Serving and monitoring measure the demo's stack and model, and dagster_runs needs its broker:
`make bench` does not start them (a benchmark run should not also be a stack start-up). Without
them, those benchmarks are recorded as skipped, naming what to run first (`make demo`), and the
exit status stays 0 for a skip; the README table shows the skip.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.report import (
    RESULTS,
    ROOT,
    CpuClock,
    command_line,
    read,
    steal_since,
    steal_text,
)

TAIL_LINES = 40


def demo_missing() -> str | None:
    """Why the demo's state is not there (None when it is): the stack up and a model served."""
    import httpx

    from easymlops.settings import get_settings

    settings = get_settings()
    try:
        ready = httpx.get(f"{settings.serve_url}/readyz", headers=settings.serve_headers, timeout=5)
    except httpx.HTTPError as exc:
        return f"needs `make demo` (no served model at {settings.serve_url}: {exc})"
    if ready.status_code != 200:
        return f"needs `make demo` (serving not ready: {ready.status_code})"
    return None


def broker_missing() -> str | None:
    from easymlops import stack
    from easymlops.settings import get_settings

    [kafka] = stack.status(get_settings(), services=["kafka"])
    if kafka.state in ("running", "external"):
        return None
    return f"needs the stack's broker: `make demo` or `make up` (kafka is {kafka.state})"


@dataclass(frozen=True)
class Benchmark:
    name: str
    argv: list[str]  # without --json; run from the repository root
    needs: Callable[[], str | None] | None = None  # the reason it cannot run now, or None


def script(name: str, *args: str) -> list[str]:
    return [sys.executable, f"benchmarks/{name}.py", "--quick", *args]


# Stack-free first, the demo's last: a failing demo check skips only the tail.
BENCHMARKS = [
    Benchmark("tune", script("tune")),
    Benchmark("validation", script("validation")),
    Benchmark("lakehouse", script("lakehouse")),
    Benchmark("dagster_runs", script("dagster_runs"), needs=broker_missing),
    Benchmark("monitoring", script("monitoring"), needs=demo_missing),
    Benchmark("serving", script("serving"), needs=demo_missing),
]


@dataclass
class Outcome:
    name: str
    command: str
    status: str  # ok | failed | skipped
    seconds: float = 0.0
    exit_code: int | None = None
    reason: str = ""
    figures: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    tail: list[str] = field(default_factory=list)
    # The share of the machine's CPU time the hypervisor took while this benchmark ran.
    cpu_steal_share: float | None = None


def say(message: str) -> None:
    print(message, flush=True)


def clock(seconds: float) -> str:
    return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"


def run_one(bench: Benchmark, index: int, total: int, started: float) -> Outcome:
    command = command_line([str(ROOT / bench.argv[1]), *bench.argv[2:]])
    at = clock(time.monotonic() - started)
    say(f"== [{index}/{total}] {bench.name}: {command}  (make bench at {at})")
    reason = bench.needs() if bench.needs else None
    if reason:
        say(f"   skipped: {reason}")
        return Outcome(bench.name, command, "skipped", reason=reason)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    began, cpu_before = time.monotonic(), CpuClock.read()
    with tempfile.TemporaryDirectory(prefix="easymlops-bench-") as tmp:
        record_path = Path(tmp) / "record.json"
        proc = subprocess.Popen(
            [*bench.argv, "--json", str(record_path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            say(f"   {bench.name} {clock(time.monotonic() - began)} | {line}")
        code = proc.wait()
        seconds = time.monotonic() - began
        outcome = Outcome(bench.name, command, "ok", seconds, code, tail=list(tail))
        if code != 0:
            outcome.status, outcome.reason = "failed", f"exit {code}"
        elif not record_path.exists():
            outcome.status, outcome.reason = "failed", "exit 0 but no record written"
        else:
            try:
                record, _ = read(record_path)  # validates the format
            except (ValueError, KeyError, TypeError) as exc:
                outcome.status, outcome.reason = "failed", f"unreadable record: {exc}"
            else:
                outcome.figures, outcome.details = record["figures"], record["details"]
    if outcome.status == "ok":
        outcome.tail = []  # the figures say it; the tail is kept to explain failures
    outcome.cpu_steal_share = steal_since(cpu_before)
    say(
        f"   {bench.name}: {outcome.status} in {clock(seconds)}, "
        f"{steal_text(outcome.cpu_steal_share)}"
        + (f" ({outcome.reason})" if outcome.reason else "")
    )
    return outcome


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    memory_kb = 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kb = int(line.split()[1])
    except OSError:  # not Linux: the platform module's names, memory unknown
        pass
    return {
        "cores": os.cpu_count(),
        "memory_gb": memory_kb / 1024**2,
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")


def run(benchmarks: list[Benchmark], results_dir: Path) -> tuple[Path, int]:
    """Run them in turn and write the results file; returns it and the exit status."""
    results: dict[str, Any] = {
        "format": 1,
        "started": now(),
        "machine": {**machine(), "load_before": list(os.getloadavg())},
        "git": git_state(),
    }
    started, cpu_before = time.monotonic(), CpuClock.read()
    outcomes = [
        run_one(bench, i, len(benchmarks), started) for i, bench in enumerate(benchmarks, 1)
    ]
    results["finished"] = now()
    results["seconds"] = time.monotonic() - started
    results["machine"]["load_after"] = list(os.getloadavg())
    results["machine"]["cpu_steal_share"] = steal_since(cpu_before)
    results["benchmarks"] = [vars(o) for o in outcomes]
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{results['started'][:10]}.json"
    # Committed: the repository's own path (in benchmarks' descriptions and output) is left out.
    text = json.dumps(results, indent=2).replace(f"{ROOT}/", "").replace(str(ROOT), ".")
    path.write_text(text + "\n")
    failed = [o.name for o in outcomes if o.status == "failed"]
    skipped = [o.name for o in outcomes if o.status == "skipped"]
    say(f"\nmake bench: {clock(results['seconds'])}, results in {path}")
    if skipped:
        say(f"skipped: {', '.join(skipped)}")
    if failed:
        say(f"FAILED: {', '.join(failed)}")
    return path, 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated benchmark names")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    chosen = BENCHMARKS
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {b.name for b in BENCHMARKS}
        if unknown:
            parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
        chosen = [b for b in BENCHMARKS if b.name in wanted]
    # A heartbeat, so a long silent stage (bronze generation, dbt) still shows it is alive.
    started = time.monotonic()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(60):
            say(f"   ... make bench at {clock(time.monotonic() - started)}")

    threading.Thread(target=beat, daemon=True).start()
    try:
        _, code = run(chosen, args.results_dir)
    finally:
        stop.set()
    return code


if __name__ == "__main__":
    sys.exit(main())
