"""Send raw payloads to `events.raw` with delivery confirmation and an optional rate limit."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from confluent_kafka import KafkaError, Message
from opentelemetry.trace import Span

from easymlops import telemetry
from easymlops.kafka import producer
from easymlops.settings import Settings

# Records per producer span: one trace per chunk, not one for a run that may last hours.
TRACE_CHUNK = 1000


@dataclass
class ProduceStats:
    sent: int = 0
    delivered: int = 0
    failed: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "sent": self.sent,
            "delivered": self.delivered,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "events_per_second": round(self.delivered / self.seconds, 1) if self.seconds else 0.0,
        }


def produce_payloads(
    settings: Settings,
    payloads: Iterable[bytes],
    *,
    topic: str | None = None,
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
    flush_timeout: float = 60.0,
) -> ProduceStats:
    """Produce every payload as-is; `rate` caps events per second. Returns delivery counts:
    `delivered` counts broker acknowledgements, not calls to produce."""
    stats = ProduceStats()
    client = producer(settings)
    target = topic or settings.topic_raw

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            stats.delivered += 1
        else:
            stats.failed += 1
            if len(stats.failures) < 10:
                stats.failures.append(str(err))

    tracer = telemetry.tracer("easymlops.produce")
    span: Span | None = None
    headers: list[tuple[str, str | bytes | None]] = []
    started = time.monotonic()
    for payload in payloads:
        if stats.sent % TRACE_CHUNK == 0:  # each record carries its chunk's span as parent
            if span is not None:
                span.end()
            span = tracer.start_span("produce", attributes={"messaging.destination.name": target})
            headers = [(telemetry.TRACEPARENT, telemetry.traceparent(span).encode())]
        while True:
            try:
                client.produce(target, value=payload, headers=headers, on_delivery=on_delivery)
                break
            except BufferError:
                client.poll(0.1)  # local queue full: let deliveries drain
        stats.sent += 1
        if stats.sent % 1000 == 0:
            client.poll(0)
            if progress:
                progress(1000)
        if rate:
            ahead = stats.sent / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    if span is not None:
        span.end()
    remaining = client.flush(flush_timeout)
    if progress and stats.sent % 1000:
        progress(stats.sent % 1000)
    if remaining:
        stats.failed += remaining
        stats.failures.append(f"{remaining} messages still undelivered after {flush_timeout}s")
    stats.seconds = time.monotonic() - started
    return stats


def produce_synthetic(
    settings: Settings,
    events: int,
    *,
    days: int = 7,
    seed: int = 42,
    start: date | None = None,
    invalid_ratio: float = 0.0,
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
    price_scale: float = 1.0,
) -> ProduceStats:
    """Generated sessions to the raw topic, and the generator's ground truth (each cart's
    purchase probability) to `<home>/truth/` once every event was delivered (easymlops.truth)."""
    from easymlops.generator import generate_payloads
    from easymlops.truth import TruthRecorder

    first = start or datetime.now(UTC).date() - timedelta(days=days)
    truth = TruthRecorder()
    payloads = generate_payloads(
        events,
        days=days,
        seed=seed,
        start=first,
        invalid_ratio=invalid_ratio,
        truth=truth,
        price_scale=price_scale,
    )
    stats = produce_payloads(settings, payloads, rate=rate, progress=progress)
    if not stats.failed:
        truth.write(settings, f"synthetic-seed{seed}-n{events}-days{days}-from{first.isoformat()}")
    return stats
