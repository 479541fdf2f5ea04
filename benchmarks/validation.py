"""Validation throughput: the local runner (`easymlops.validate`) against a raw
consume-and-produce passthrough on the same broker and the same data, measured in the same run,
with the Flink bounded job's figure beside them.

The baseline consumes the raw topic and produces every message unchanged with the runner's kind
of delivery (same consumer settings, same batch size, each batch produced and its offsets
committed in one Kafka transaction, in a commit thread while the next batch is read), so the
ratio runner/passthrough is what validation and the Redis session features cost on top of the
exactly-once plumbing. Each round measures every path once, in turn, on the same data; the ratio
is taken within each round (paired), and the median over the rounds is the figure, printed with
the lowest and highest round. Goal (issue 15): a median of at least 0.85 with session features
on, over 5 rounds.

Starts its own broker and Redis on free ports in a temporary home (a running `easymlops up` is
never touched) and stops them at the end, also on Ctrl-C. Each measurement first checks that
every event came out exactly once, so a broken run cannot print a good number.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from benchmarks import report
from easymlops import flink_cluster, stack
from easymlops.generator import GenerationStats, generate_payloads
from easymlops.kafka import consumer, ensure_topics, partitions, producer
from easymlops.produce import produce_payloads
from easymlops.settings import Settings
from easymlops.validate import ValidationStats, Validator

ROOT = Path(__file__).resolve().parent.parent
FLINK_PYTHON = ROOT / ".flink-venv" / "bin" / "python"
GOAL = 0.85
BASELINE = "passthrough, transactional"
RUNNERS = ("runner, session features on", "runner, session features off")
FLINK_KAFKA = "flink on kafka, features off"
# A run that receives nothing for this long is stuck (broker gone): fail instead of hanging.
STALL_SECONDS = 60.0


def say(message: str) -> None:
    print(message, flush=True)


def isolated_settings(home: Path, broker: Literal["tansu", "kafka"] = "tansu") -> Settings:
    """Settings of a private stack: explicit values win over any EASYMLOPS_* in the environment,
    so an external broker configured there is never used either."""
    return Settings(
        home=home,
        kafka_bootstrap="",
        redis_url="",
        kafka_port=stack.free_port(),
        redis_port=stack.free_port(),
        mlflow_port=stack.free_port(),
        ray_port=stack.free_port(),
        ray_dashboard_port=stack.free_port(),
        serve_port=stack.free_port(),
        dagster_port=stack.free_port(),
        broker=broker,
        kafka_controller_port=stack.free_port(),
        flink_rest_port=stack.free_port(),
        flink_rpc_port=stack.free_port(),
        flink_taskmanager_port=stack.free_port(),
    )


def with_topics(settings: Settings, name: str, raw: str | None = None) -> Settings:
    """Settings whose topics are this measurement's own (created on the broker); `raw` reads
    an existing raw topic instead."""
    scoped = settings.model_copy(
        update={
            "topic_raw": raw or f"{name}.raw",
            "topic_validated": f"{name}.validated",
            "topic_invalid": f"{name}.invalid",
            "topic_predictions": f"{name}.predictions",
        }
    )
    ensure_topics(scoped)
    return scoped


@dataclass
class Result:
    name: str
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


# ---- producing the data once -------------------------------------------------------------------
def produce_raw(settings: Settings, payloads: list[bytes]) -> None:
    stats = produce_payloads(settings, payloads)
    if stats.failed or stats.delivered != len(payloads):
        raise SystemExit(f"producing to {settings.topic_raw} failed: {stats.to_dict()}")
    say(f"  {stats.delivered:,} events in {settings.topic_raw} ({stats.seconds:.1f} s)")


def count_committed(settings: Settings, topic: str, expected: int) -> int:
    """How many committed records `topic` holds, read by an independent read_committed client;
    after reaching `expected` it still listens a moment, so extra records are counted too."""
    reader = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"bench-count-{uuid.uuid4().hex[:6]}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    reader.assign([TopicPartition(topic, p, 0) for p in partitions(settings, topic)])
    count = 0
    deadline = time.monotonic() + 120
    quiet_since = time.monotonic()
    try:
        while time.monotonic() < deadline:
            messages = reader.consume(10_000, timeout=0.5)
            now = time.monotonic()
            count += sum(1 for m in messages if m.error() is None)
            if messages:
                quiet_since = now
            elif now - quiet_since > (1.0 if count >= expected else 10.0):
                break
    finally:
        reader.close()
    return count


def check(what: str, got: int, expected: int) -> None:
    if got != expected:
        raise SystemExit(f"conservation broken: {what} = {got:,}, expected {expected:,}")


# ---- the baselines -------------------------------------------------------------------------------
def assigned_consumer(settings: Settings, group: str) -> Consumer:
    """The runner's consumer (same helper, same settings), assigned to every raw partition from
    the beginning, as the runner does for a fresh group."""
    source = consumer(settings, group)
    topic = settings.topic_raw
    source.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions(settings, topic)])
    return source


def data_messages(messages: list[Message]) -> list[Message]:
    good = []
    for message in messages:
        error = message.error()
        if error is None:
            good.append(message)
        elif error.code() != KafkaError._PARTITION_EOF:
            raise SystemExit(f"consumer error: {error.str()}")
    return good


def passthrough(
    settings: Settings, n_events: int, batch_size: int, *, transactional: bool
) -> Result:
    """Copy the raw topic to the validated topic unchanged. Transactional: each batch produced
    and its offsets committed in one transaction, exactly as the runner does (in a commit
    thread, while the next batch is consumed; one transaction at a time). Plain: produce and
    flush once at the end, no offset commits (the broker's floor, not exactly once)."""
    name = BASELINE if transactional else "passthrough, plain"
    group = f"bench-passthrough-{uuid.uuid4().hex[:6]}"
    overrides = {"transactional.id": group} if transactional else {}
    sink = producer(settings, **overrides)
    if transactional:
        sink.init_transactions(30)
    # Assigned last, right before the clock starts, as in the runner's constructor: assigned
    # earlier, the consumer would prefetch the topic during init_transactions, off the clock.
    source = assigned_consumer(settings, group)
    out = settings.topic_validated

    def copy(messages: list[Message]) -> None:
        if transactional:
            sink.begin_transaction()
        next_offsets: dict[int, int] = {}
        for message in messages:
            while True:
                try:
                    sink.produce(out, message.value(), message.key())
                    break
                except BufferError:  # local queue full: let deliveries drain
                    sink.poll(0.1)
            next_offsets[message.partition() or 0] = (message.offset() or 0) + 1
        if transactional:
            sink.send_offsets_to_transaction(
                [TopicPartition(settings.topic_raw, p, o) for p, o in next_offsets.items()],
                source.consumer_group_metadata(),
                30,
            )
            sink.commit_transaction(60)
        else:
            sink.poll(0)

    committer = ThreadPoolExecutor(1, thread_name_prefix="passthrough-commit")
    committing: Future[None] | None = None
    copied = 0
    started = last_message = time.monotonic()
    try:
        while copied < n_events:
            messages = data_messages(source.consume(batch_size, timeout=0.5))
            if not messages:
                if time.monotonic() - last_message > STALL_SECONDS:
                    raise SystemExit(f"{name}: stalled at {copied:,} of {n_events:,} events")
                continue
            last_message = time.monotonic()
            if committing is not None:
                committing.result()
            committing = committer.submit(copy, messages)
            copied += len(messages)
        if committing is not None:
            committing.result()
        if sink.flush(60):
            raise SystemExit(f"{name}: deliveries still pending after 60 s")
        seconds = time.monotonic() - started
    finally:
        committer.shutdown(wait=True)
        source.close()
    check(f"{name}: records in {out}", count_committed(settings, out, n_events), n_events)
    return Result(name, copied, seconds)


# ---- the runner ----------------------------------------------------------------------------------
def runner(
    settings: Settings, n_events: int, n_invalid: int, batch_size: int, *, sessions: bool
) -> Result:
    """`easymlops.validate` as `run_validator` runs it, timed from the start of its loop to the
    commit of the batch that completes the N events. The Validator is built first (producer
    init_transactions, partition assignment: setup, as for the passthrough), and the idle wait
    by which `until_idle` confirms the topic is drained comes after the last commit, so neither
    is in the figure (stats.seconds would include both)."""
    name = RUNNERS[0] if sessions else RUNNERS[1]
    if sessions:
        # Our private Redis: without this, a later round would find every event id already
        # applied and take the script's cheap no-op path.
        redis.Redis.from_url(settings.redis).flushdb()
    validator = Validator(
        settings, batch_size=batch_size, session_features=sessions, log_interval=3600
    )
    finished: list[float] = []

    def progress(stats: ValidationStats) -> None:
        if stats.consumed >= n_events and not finished:
            finished.append(time.monotonic())

    started = time.monotonic()
    stats = validator.run(until_idle=True, idle_seconds=1.0, progress=progress)
    if not finished:
        raise SystemExit(f"{name}: drained after {stats.consumed:,} of {n_events:,} events")
    check(f"{name}: consumed", stats.consumed, n_events)
    check(f"{name}: valid + invalid", stats.valid + stats.invalid, n_events)
    check(f"{name}: invalid (generated {n_invalid:,})", stats.invalid, n_invalid)
    out_valid = count_committed(settings, settings.topic_validated, stats.valid)
    out_invalid = count_committed(settings, settings.topic_invalid, stats.invalid)
    check(f"{name}: records in the output topics", out_valid + out_invalid, n_events)
    check(f"{name}: records in {settings.topic_invalid}", out_invalid, n_invalid)
    return Result(name, stats.consumed, finished[0] - started)


# ---- Flink ---------------------------------------------------------------------------------------
FLINK_RATE = re.compile(r"([\d,]+) events/s over the job's ([\d.]+) s")
FLINK_COUNTS = re.compile(r"messages -> valid (\d+), invalid (\d+)")


def flink_bounded(settings: Settings, payloads: list[bytes], n_invalid: int, work: Path) -> Result:
    """The same payloads as a JSON-lines file through the PyFlink job in bounded mode; its own
    events/s over the job's net runtime (the mini-cluster start excluded)."""
    source = work / "events.jsonl"
    # Generated payloads never contain a newline (JSON is compact; invalid kinds neither).
    source.write_bytes(b"".join(p + b"\n" for p in payloads))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "EASYMLOPS_TOPIC_RAW": settings.topic_raw,
        "EASYMLOPS_HOME": str(settings.home_dir),
    }
    command = [str(FLINK_PYTHON), "-m", "flink_jobs.validation_job", "bounded"]
    done = subprocess.run(
        [*command, "--input", str(source), "--output", str(work / "flink-out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    rate, counts = FLINK_RATE.search(done.stdout), FLINK_COUNTS.search(done.stdout)
    if done.returncode != 0 or rate is None or counts is None:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise SystemExit(f"the Flink job failed (exit {done.returncode}):\n{tail}")
    valid, invalid = int(counts[1]), int(counts[2])
    check("flink: valid + invalid", valid + invalid, len(payloads))
    check("flink: invalid", invalid, n_invalid)
    return Result("flink bounded (job time)", len(payloads), float(rate[2]))


def output_timestamps(settings: Settings) -> list[int]:
    """Broker timestamps (ms) of every committed output record, read_committed."""
    reader = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"bench-stamps-{uuid.uuid4().hex[:6]}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    topics = (settings.topic_validated, settings.topic_invalid)
    reader.assign([TopicPartition(t, p, 0) for t in topics for p in partitions(settings, t)])
    stamps: list[int] = []
    quiet_since = time.monotonic()
    try:
        while time.monotonic() - quiet_since < 2.0:
            messages = reader.consume(10_000, timeout=0.5)
            if messages:
                quiet_since = time.monotonic()
            stamps += [m.timestamp()[1] for m in messages if m.error() is None]
    finally:
        reader.close()
    return stamps


def flink_kafka(settings: Settings, n_events: int, n_invalid: int) -> Result:
    """The job in Kafka mode on the private Flink cluster, over the pre-filled raw topic, exactly
    once (checkpoint every second). Its rate is events over the span between its first and its
    last output record (the records' CreateTime, stamped by the job's producers as it writes),
    so the job's start (about 30 s of JVM, Python workers and Kafka setup) is not in it; the
    run counts only once every record is committed."""
    name = settings.topic_raw.rsplit(".", 1)[0]
    args = ["kafka", "--checkpoint-interval-ms", "1000", "--no-session-features"]
    args += ["--group-id", f"{name}-flink", "--transactional-id-prefix", name]
    env = {
        "EASYMLOPS_KAFKA_BOOTSTRAP": settings.bootstrap_servers,
        "EASYMLOPS_TOPIC_RAW": settings.topic_raw,
        "EASYMLOPS_TOPIC_VALIDATED": settings.topic_validated,
        "EASYMLOPS_TOPIC_INVALID": settings.topic_invalid,
    }
    job = flink_cluster.submit(settings, stack.flink_data_dir(settings), args, env=env)
    try:
        deadline = time.monotonic() + 1800
        while True:
            valid = count_committed(settings, settings.topic_validated, n_events - n_invalid)
            invalid = count_committed(settings, settings.topic_invalid, n_invalid)
            if valid + invalid >= n_events or time.monotonic() > deadline:
                break
            say(f"  flink: {valid + invalid:,} of {n_events:,} committed")
            time.sleep(5)
    finally:
        flink_cluster.cancel(settings, job)
    check("flink kafka: valid + invalid", valid + invalid, n_events)
    check("flink kafka: invalid", invalid, n_invalid)
    stamps = output_timestamps(settings)
    check("flink kafka: records read back", len(stamps), n_events)
    return Result(FLINK_KAFKA, n_events, (max(stamps) - min(stamps)) / 1000)


# ---- main ----------------------------------------------------------------------------------------
def measure(label: str, run: Callable[[], Result]) -> Result:
    say(f"{label} ...")
    result = run()
    say(f"  {result.events:,} events in {result.seconds:.2f} s: {result.rate:,.0f} events/s")
    return result


def run_round(
    settings: Settings,
    payloads: list[bytes],
    n_invalid: int,
    batch: int,
    r: int,
    *,
    flink_on_kafka: bool = False,
) -> list[Result]:
    """One measurement of each path on fresh topics holding the same payloads. The runner
    resumes from its consumer group's committed offsets (one fixed group per raw topic), so
    each runner measurement reads a copy of its own; the passthroughs share one."""
    n = len(payloads)
    shared = with_topics(settings, f"bench-{r}-shared")
    features_on = with_topics(settings, f"bench-{r}-runner-on")
    features_off = with_topics(settings, f"bench-{r}-runner-off")
    say(f"round {r + 1}: producing the raw topics ...")
    for scoped in (shared, features_on, features_off):
        produce_raw(scoped, payloads)
    tx_out = with_topics(settings, f"bench-{r}-tx", raw=shared.topic_raw)
    plain_out = with_topics(settings, f"bench-{r}-plain", raw=shared.topic_raw)
    flink: list[Result] = []
    if flink_on_kafka:
        flink_out = with_topics(settings, f"bench-{r}-flink", raw=shared.topic_raw)
        flink.append(measure(FLINK_KAFKA, lambda: flink_kafka(flink_out, n, n_invalid)))
    return [
        *flink,
        measure(BASELINE, lambda: passthrough(tx_out, n, batch, transactional=True)),
        measure(RUNNERS[0], lambda: runner(features_on, n, n_invalid, batch, sessions=True)),
        measure(RUNNERS[1], lambda: runner(features_off, n, n_invalid, batch, sessions=False)),
        measure(
            "passthrough, plain", lambda: passthrough(plain_out, n, batch, transactional=False)
        ),
    ]


def run_all(settings: Settings, args: argparse.Namespace, work: Path) -> int:
    n, batch = args.events, args.batch_size
    say(f"generating {n:,} events ({args.invalid_ratio:.0%} invalid) ...")
    generated = GenerationStats()
    payloads = list(
        generate_payloads(n, days=7, seed=11, invalid_ratio=args.invalid_ratio, stats=generated)
    )
    n_invalid = generated.invalid

    # Rounds interleave the paths, so a noisy neighbour (2 shared cores) slows them alike; the
    # ratios are paired within a round and summarised by their median and range, never by the
    # best round.
    runs: dict[str, list[Result]] = {}
    for r in range(args.rounds):
        rounds = run_round(
            settings, payloads, n_invalid, batch, r, flink_on_kafka=args.broker == "kafka"
        )
        for result in rounds:
            runs.setdefault(result.name, []).append(result)

    flink: Result | None = None
    if args.no_flink:
        flink_note = "skipped (--no-flink)"
    elif not FLINK_PYTHON.exists():
        flink_note = "skipped: no .flink-venv (build it with `make flink-venv`)"
    else:
        flink = measure(
            "flink bounded job (mini-cluster, file in/out)",
            lambda: flink_bounded(settings, payloads, n_invalid, work),
        )
        flink_note = "one run; events/s over the job's net runtime"

    median = {name: statistics.median(r.rate for r in results) for name, results in runs.items()}
    say("")
    say(
        f"{n:,} events ({n_invalid:,} invalid), batch size {batch:,}, 1 broker + 1 Redis, "
        f"median of {args.rounds} round(s)"
    )
    figures: list[report.Figure] = []
    say(f"{'':<32}{'events/s':>10}  every round")
    for name, results in runs.items():
        rounds = ", ".join(f"{r.rate:,.0f}" for r in results)
        say(f"{name:<32}{median[name]:>10,.0f}  {rounds}")
    if flink is not None:
        say(f"{'flink bounded (job time)':<32}{flink.rate:>10,.0f}  {flink_note}")
        figures.append(
            report.Figure(
                "flink bounded job (one run, job time)",
                flink.rate,
                "events/s",
                report.Baseline(f"{BASELINE} (median)", median[BASELINE]),
            )
        )
    else:
        say(f"{'flink bounded':<32}{'-':>10}  {flink_note}")
    for name in (FLINK_KAFKA, *RUNNERS):
        if name not in runs:
            continue
        paired = [a.rate / b.rate for a, b in zip(runs[name], runs[BASELINE], strict=True)]
        ratio = statistics.median(paired)
        if name == RUNNERS[0]:
            goal = f"goal median >= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'}"
        else:
            goal = "same broker, same topic" if name == FLINK_KAFKA else "for reference"
        figures.append(
            report.Figure(
                f"{name} ({args.broker}, median)",
                median[name],
                "events/s",
                report.Baseline(f"{BASELINE} (median)", median[BASELINE]),
                ratio=ratio,
                ratio_note=(
                    f"median of {len(paired)} paired rounds, {min(paired):.2f}-{max(paired):.2f}"
                ),
                goal=report.Goal("ratio", ">=", GOAL) if name == RUNNERS[0] else None,
            )
        )
        say(
            f"ratio {name} / passthrough: median {ratio:.2f}, rounds {min(paired):.2f}-"
            f"{max(paired):.2f} ({goal})"
        )
    report.write(
        args.json,
        "validation",
        figures,
        quick=args.quick,
        details={"events": n, "invalid": n_invalid, "rounds": args.rounds, "broker": args.broker},
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--invalid-ratio", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=5000, help="the runner's default")
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved; ratios paired per round"
    )
    parser.add_argument("--no-flink", action="store_true", help="skip the Flink bounded job")
    parser.add_argument(
        "--broker",
        choices=("tansu", "kafka"),
        default="tansu",
        help="kafka: Apache Kafka (make jars), plus the Flink job in Kafka mode on a private "
        "Flink cluster in each round",
    )
    report.add_arguments(parser)
    args = parser.parse_args()
    report.apply_quick(parser, args, events=20_000, rounds=2, no_flink=True)

    # SIGTERM unwinds like Ctrl-C, so the `finally` below stops the private stack either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="easymlops-bench-") as tmp:
        work = Path(tmp)
        settings = isolated_settings(work / "home", args.broker)
        services = ["kafka", "redis"] + (list(stack.FLINK) if args.broker == "kafka" else [])
        say(f"starting a private {', '.join(services)} ({args.broker}) in {work} ...")
        try:
            stack.up(settings, services=services)
            return run_all(settings, args, work)
        except KeyboardInterrupt:
            say("interrupted")
            return 130
        finally:
            say("stopping them ...")
            stack.down(settings, services=services)


if __name__ == "__main__":
    sys.exit(main())
