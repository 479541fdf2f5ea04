"""Every prediction to the `predictions` topic, without ever slowing or failing a request.

librdkafka's own producer queue is the bounded queue: `produce` only appends to it (it never
waits for the broker), a background thread serves delivery reports, and a full queue raises
BufferError at once, which is counted (`easymlops_serving_predictions_log_dropped`) and the
request goes on. While the broker is away the queue holds the records and librdkafka retries
them without a deadline (`message.timeout.ms` 0 = infinite), idempotently and in order, so a
broker pause loses nothing that fits in the queue. Key: the request id (one record per row).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from serving.metrics import serving_metrics

log = logging.getLogger("ray.serve.easymlops")


class PredictionLog:
    def __init__(self, bootstrap_servers: str, topic: str, max_queued: int) -> None:
        self.topic = topic
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap_servers,
                "enable.idempotence": True,
                "linger.ms": 50,
                "queue.buffering.max.messages": max_queued,
                "message.timeout.ms": 0,  # retry until the broker is back: nothing expires
                "logger": logging.getLogger("easymlops.kafka.predictions"),
            }
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="prediction-log", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.5)

    @staticmethod
    def _delivered(error: KafkaError | None, message: Message) -> None:
        outcome = "delivered" if error is None else "failed"
        serving_metrics().predictions_logged.labels(outcome).inc()
        if error is not None:
            log.warning("prediction %s not logged: %s", message.key(), error)

    def send(self, request_id: str, record: Mapping[str, Any]) -> bool:
        """Queue one record; False (and counted) when the queue is full."""
        try:
            self._producer.produce(
                self.topic,
                key=request_id.encode(),
                value=json.dumps(record, separators=(",", ":"), default=str).encode(),
                on_delivery=self._delivered,
            )
        except BufferError:
            serving_metrics().predictions_log_dropped.inc()
            return False
        return True

    def pending(self) -> int:
        return len(self._producer)

    def close(self, timeout: float = 10.0) -> int:
        """Stop the poller and flush; returns records still undelivered."""
        self._stop.set()
        self._thread.join(timeout=2)
        return self._producer.flush(timeout)
