"""Real-time session features: the stream (local runner and Flink job) keeps each session's events
in Redis, and serving computes the features of a cart from them, one definition for both.

The offline twin is dbt_project/models/marts/fct_cart_events.sql: a cart's session features use
only the session's events strictly before the cart in the order (event_time, funnel rank,
event_id), funnel rank view < cart < remove_from_cart < purchase. The store therefore keeps the
events themselves, not running sums: sums would count the scored cart itself and everything after
it (the purchase!) as soon as the stream has seen them.

Stored per session: the hash `feat:session:{user_session}` (easymlops.features.session_key), one
field per event, `e:{event_id}` -> `{epoch microseconds}|{funnel rank}|{product_id}` (see
`event_field`), expiring `session_ttl_seconds` after its last write. Writing a field is naturally
idempotent per event id: a batch replayed after a crash or an aborted Kafka transaction rewrites
the same fields, so no set of applied ids and no script are needed.

Reading (`features_at`): an event e counts for a cart at moment t with id c iff
(e.time, e.rank, e.id) < (t, rank(cart), c); without c, events at the instant t count iff their
rank is below cart's (views); an event whose id is c never counts. session_seconds is
t - min(time of the counted events and t), as fct_cart_events computes it. Event ids compare by
code point (= UTF-8 bytes), like DuckDB; a Postgres warehouse must use the "C" collation for ties
of two carts at the same microsecond to be ordered alike.

Stdlib only (besides easymlops.features and easymlops.schema): the Flink job's virtualenv imports
this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from easymlops.features import session_key
from easymlops.schema import Event

# The order of event types at the same instant (fct_cart_events.sql and stg_events' funnel_rank).
FUNNEL_RANK: dict[str, int] = {"view": 0, "cart": 1, "remove_from_cart": 2, "purchase": 3}
VIEW_RANK = FUNNEL_RANK["view"]
CART_RANK = FUNNEL_RANK["cart"]
EVENT_PREFIX = "e:"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def epoch_micros(moment: datetime) -> int:
    """Microseconds since the epoch, exactly (integer arithmetic; a naive time is UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MICROSECOND


def event_field(event: Event) -> tuple[str, str]:
    """The hash field and value that stand for one event in its session's hash."""
    # Inline arithmetic rather than epoch_micros: this runs once per streamed event.
    delta = event.event_time - _EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return (
        EVENT_PREFIX + event.event_id,
        f"{micros}|{FUNNEL_RANK[event.event_type]}|{event.product_id}",
    )


def field_of(
    event_id: str, event_time: datetime, event_type: str, product_id: int
) -> tuple[str, str]:
    """`event_field` from an event's columns (batch scoring reads them from silver)."""
    return (
        EVENT_PREFIX + event_id,
        f"{epoch_micros(event_time)}|{FUNNEL_RANK[event_type]}|{product_id}",
    )


def session_fields(events: Iterable[Event]) -> dict[str, str]:
    """The hash the stream keeps for a session that has seen `events` (each id once)."""
    return dict(map(event_field, events))


def features_at(
    fields: Mapping[str, str],
    product_id: int,
    at: datetime,
    event_id: str | None = None,
) -> dict[str, float]:
    """The model's session features of a cart of `product_id` at `at` (with id `event_id` when
    known), from the session's stored hash: only the events strictly before the cart count.

    Fields that are not events, or whose value does not parse, are ignored (a bad write must not
    fail a request). An absent hash means no event of the session was seen: all zeros, what the
    offline definition gives a cart that opens its session."""
    t = epoch_micros(at)
    prefix = len(EVENT_PREFIX)
    events = views = carts = product_views = 0
    start = t
    viewed: set[int] = set()
    for name, value in fields.items():
        if not name.startswith(EVENT_PREFIX):
            continue
        eid = name[prefix:]
        if eid == event_id:
            continue
        try:
            micros_text, rank_text, product_text = value.split("|")
            micros, rank, product = int(micros_text), int(rank_text), int(product_text)
        except ValueError:
            continue
        if micros > t or (
            micros == t
            and (rank > CART_RANK or (rank == CART_RANK and (event_id is None or eid > event_id)))
        ):
            continue  # at or after the cart in (time, rank, id) order
        events += 1
        if micros < start:
            start = micros
        if rank == VIEW_RANK:
            views += 1
            viewed.add(product)
            if product == product_id:
                product_views += 1
        elif rank == CART_RANK:
            carts += 1
    return {
        "session_events": float(events),
        "session_views": float(views),
        "session_product_views": float(product_views),
        "session_carts": float(carts),
        "session_seconds": (t - start) / 1e6,
        "session_distinct_products": float(len(viewed)),
    }


# One call stores some sessions' events. KEYS: one per entry, a session's hash (a session with
# more than EVENTS_PER_CALL events in one `apply` has several entries). ARGV: the TTL, then per
# entry its number of events n and their n field/value pairs. Returns the fields added, i.e. the
# events not stored before. One command for a few hundred sessions: a pipeline of an HSET and an
# EXPIRE per session cost the client 60% more time per event (redis-py's work per command), and
# the former read-modify-write script with its set of applied ids twice the Redis time.
STORE_EVENTS_LUA = """
local ttl, a, added = ARGV[1], 2, 0
for k = 1, #KEYS do
  local last = a + 2 * tonumber(ARGV[a])
  added = added + redis.call('HSET', KEYS[k], unpack(ARGV, a + 1, last))
  redis.call('EXPIRE', KEYS[k], ttl)
  a = last + 1
end
return added
"""
# Events per script call: a call blocks Redis (serving's reads too) while it runs, ~2 ms for
# this many; and Lua's unpack() takes at most ~8,000 values.
EVENTS_PER_CALL = 500


class SessionFeatureWriter:
    """Writes validated events to their sessions' hashes in Redis: one pipelined round trip per
    call to `apply`, one script call (an HSET and an EXPIRE per session) per EVENTS_PER_CALL
    events. The script is sent whole (EVAL, cached by Redis), so a Redis restart that empties
    the script cache needs no handling."""

    def __init__(self, client: Any, ttl_seconds: int) -> None:
        self.client = client  # a redis.Redis (not imported here: see the module docstring)
        self.ttl_seconds = ttl_seconds

    def apply(self, events: Sequence[Event]) -> int:
        """Store the events; return how many were not stored yet. Raises redis errors to the
        caller, which retries the batch (safe: rewriting a field is a no-op)."""
        by_session: dict[str, list[str]] = {}  # field, value, field, value, ...
        for event in events:
            flat = by_session.get(event.user_session)
            if flat is None:
                flat = by_session[event.user_session] = []
            flat += event_field(event)
        if not by_session:
            return 0
        pipe = self.client.pipeline(transaction=False)
        most = 2 * EVENTS_PER_CALL
        keys: list[str] = []
        args: list[Any] = [self.ttl_seconds]
        size = 0
        for user_session, flat in by_session.items():
            key = session_key(user_session)
            for lo in range(0, len(flat), most):
                part = flat[lo : lo + most]
                if size + len(part) > most:
                    pipe.eval(STORE_EVENTS_LUA, len(keys), *keys, *args)
                    keys, args, size = [], [self.ttl_seconds], 0
                keys.append(key)
                args.append(len(part) // 2)
                args += part
                size += len(part)
        pipe.eval(STORE_EVENTS_LUA, len(keys), *keys, *args)
        return sum(pipe.execute())

    def send_packed(self, commands: Sequence[bytes]) -> int:
        """Run `apply`'s EVAL commands already packed as RESP (the validator's compiled fast
        path builds them: easymlops_native.pack_session_writes), pipelined on one connection;
        return the fields added. Raises redis errors like `apply`."""
        if not commands:
            return 0
        pool = self.client.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command(list(commands))
            added = 0
            for _ in commands:
                added += connection.read_response()
        except BaseException:
            # Replies left unread would answer the next user's command: drop the connection.
            connection.disconnect()
            raise
        finally:
            pool.release(connection)
        return added
