"""The validator's compiled fast path (native/src/lib.rs)."""

from typing import Any

class FastBatch:
    values: list[bytes | None]
    keys: list[bytes | None]
    valid: list[bool]
    sources: list[bytes]
    upstream: list[bytes | None]
    next_offsets: dict[int, int]
    fallback: list[tuple[int, int]]
    failed: list[int]
    session_fields: list[tuple[str, str, str]]
    traces: dict[bytes, int]
    fast_valid: int

def route_payload(payload: bytes, latest_micros: int) -> tuple[bytes, bytes, str, str] | None: ...
def route_messages(messages: list[Any], latest_micros: int, trace_header: str) -> FastBatch: ...
def pack_session_writes(
    session_fields: list[tuple[str, str, str]],
    key_prefix: str,
    ttl_seconds: int,
    script: str,
    per_call: int,
) -> list[bytes]: ...
