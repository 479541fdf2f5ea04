"""Where the validator's time goes on this machine: CPU per event of each part, and how many of
the machine's cores the whole path keeps busy.

Runs the transactional passthrough and the runner with session features on (the two paths of
`benchmarks/validation.py`, same code, same data, one round each, on a private broker and Redis)
while a sampler reads every thread's CPU time from /proc. Per event it prints the microseconds
of CPU spent in
- the main thread: consume, route (the compiled fast path; `route` for the rest), trace spans;
- the commit thread: produce into the transaction, send offsets, commit;
- the Redis thread: session features (runner only);
- librdkafka's own threads (C: network I/O, batching, compression);
- the broker process and the Redis server;
and the wall time, so `CPU / wall` says how many cores were busy: near the machine's count, the
cores are the limit and the passthrough's ratio is bounded by what validation adds on top.

    python benchmarks/validation_profile.py [--events 200000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from benchmarks.validation import (
    Result,
    isolated_settings,
    passthrough,
    produce_raw,
    runner,
    with_topics,
)
from easymlops import stack
from easymlops.generator import GenerationStats, generate_payloads

TICKS = os.sysconf("SC_CLK_TCK")
PARTS = (
    "main thread (consume, route, spans)",
    "commit thread (produce, commit)",
    "Redis thread (session features)",
    "librdkafka threads",
    "other threads of the process",
    "broker process",
    "Redis server",
)


def cpu_seconds(stat_path: Path) -> float | None:
    """utime + stime of a /proc/.../stat file, in seconds (None once the thread is gone)."""
    try:
        text = stat_path.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def part_of(name: str, comm: str, main: bool) -> str:
    if main:
        return PARTS[0]
    if name.startswith(("validator-commit", "passthrough-commit")):
        return PARTS[1]
    if name.startswith("validator-redis"):
        return PARTS[2]
    if comm.startswith("rdk:"):
        return PARTS[3]
    return PARTS[4]


class ThreadSampler:
    """Samples every thread's CPU time. A thread there at the start counts from its time then,
    one started later from zero; one that ends keeps its last sample."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.labels: dict[int, tuple[str, str]] = {}  # tid -> (Python name, comm)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="cpu-sampler")

    def sample(self, *, starting: bool = False) -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        for task in Path("/proc/self/task").iterdir():
            tid = int(task.name)
            seconds = cpu_seconds(task / "stat")
            if seconds is None or names.get(tid) == "cpu-sampler":
                continue
            if starting:
                self.first[tid] = seconds
            # A new thread shows in /proc before `threading` lists it: keep asking its name.
            if not self.labels.get(tid, ("", ""))[0]:
                comm = (task / "comm").read_text().strip() if (task / "comm").exists() else ""
                self.labels[tid] = (names.get(tid, ""), comm)
            self.last[tid] = seconds

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> ThreadSampler:
        self.sample(starting=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def by_part(self) -> Counter[str]:
        totals: Counter[str] = Counter()
        for tid, (name, comm) in self.labels.items():
            part = part_of(name, comm, tid == os.getpid())
            totals[part] += self.last[tid] - self.first.get(tid, 0.0)
        return totals


def route_alone(payloads: list[bytes]) -> float:
    """Seconds per event of `validate.route` alone: one thread, no Kafka, no Redis."""
    from datetime import UTC, datetime

    from easymlops.schema import route

    received_at = datetime.now(UTC)
    started = time.process_time()
    for offset, payload in enumerate(payloads):
        route(payload, key=None, topic="raw", partition=0, offset=offset, received_at=received_at)
    return (time.process_time() - started) / len(payloads)


def fast_path_alone(payloads: list[bytes]) -> float:
    """Seconds per event of the compiled fast path alone (easymlops_native.route_payload, what
    the runner calls for each plain valid event): one thread, no Kafka, no Redis."""
    from datetime import UTC, datetime

    from easymlops_native import route_payload

    from easymlops.schema import MAX_FUTURE
    from easymlops.session_features import epoch_micros

    latest = epoch_micros(datetime.now(UTC) + MAX_FUTURE)
    started = time.process_time()
    for payload in payloads:
        route_payload(payload, latest)
    return (time.process_time() - started) / len(payloads)


def profile(
    label: str, run: Callable[[], Result], broker_pid: int, redis_pid: int
) -> tuple[Result, Counter[str]]:
    broker_stat = Path(f"/proc/{broker_pid}/stat")
    redis_stat = Path(f"/proc/{redis_pid}/stat")
    broker_before, redis_before = cpu_seconds(broker_stat), cpu_seconds(redis_stat)
    with ThreadSampler() as sampler:
        result = run()
    parts = sampler.by_part()
    parts[PARTS[5]] = (cpu_seconds(broker_stat) or 0.0) - (broker_before or 0.0)
    parts[PARTS[6]] = (cpu_seconds(redis_stat) or 0.0) - (redis_before or 0.0)
    print(f"{label}: {result.events:,} events in {result.seconds:.2f} s", flush=True)
    return result, parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=5000)
    args = parser.parse_args()
    n = args.events
    generated = GenerationStats()
    payloads = list(generate_payloads(n, days=7, seed=11, invalid_ratio=0.02, stats=generated))
    with tempfile.TemporaryDirectory(prefix="easymlops-profile-") as tmp:
        settings = isolated_settings(Path(tmp) / "home")
        services = ["kafka", "redis"]
        stack.up(settings, services=services)
        try:
            pids = {s.name: s.pid for s in stack.status(settings, services=services)}
            if not (pids["kafka"] and pids["redis"]):
                raise SystemExit(f"no pid for the broker or Redis: {pids}")
            shared = with_topics(settings, "profile-shared")
            features_on = with_topics(settings, "profile-runner")
            for scoped in (shared, features_on):
                produce_raw(scoped, payloads)
            tx_out = with_topics(settings, "profile-tx", raw=shared.topic_raw)
            runs = [
                profile(
                    "passthrough, transactional",
                    lambda: passthrough(tx_out, n, args.batch_size, transactional=True),
                    pids["kafka"],
                    pids["redis"],
                ),
                profile(
                    "runner, session features on",
                    lambda: runner(
                        features_on, n, generated.invalid, args.batch_size, sessions=True
                    ),
                    pids["kafka"],
                    pids["redis"],
                ),
            ]
        finally:
            stack.down(settings, services=services)

    cores = os.cpu_count() or 1
    print()
    print(f"CPU per event (µs), {n:,} events, {cores} cores")
    header = "".join(f"{r.name.split(',')[0]:>14}" for r, _ in runs)
    print(f"{'':<40}{header}")
    for part in PARTS:
        row = "".join(f"{1e6 * parts[part] / r.events:>14.1f}" for r, parts in runs)
        print(f"{part:<40}{row}")
    totals = [sum(parts.values()) for _, parts in runs]
    print(
        f"{'all CPU':<40}"
        + "".join(f"{1e6 * t / r.events:>14.1f}" for t, (r, _) in zip(totals, runs, strict=True))
    )
    print(f"{'wall':<40}" + "".join(f"{1e6 * r.seconds / r.events:>14.1f}" for r, _ in runs))
    print(
        f"{'cores busy (all CPU / wall)':<40}"
        + "".join(f"{t / r.seconds:>14.2f}" for t, (r, _) in zip(totals, runs, strict=True))
    )
    print(f"{'events/s':<40}" + "".join(f"{r.rate:>14,.0f}" for r, _ in runs))
    print(f"ratio runner / passthrough: {runs[1][0].rate / runs[0][0].rate:.2f}")
    print(f"route alone (one thread, no I/O): {1e6 * route_alone(payloads):.1f} µs per event")
    print(
        "compiled fast path alone (one thread, no I/O): "
        f"{1e6 * fast_path_alone(payloads):.1f} µs per event"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
