//! The validator's compiled fast path (easymlops.validate).
//!
//! `easymlops.schema.route` is the one definition of the event contract; this module only
//! recognises the common case of it: a JSON object whose fields all have the plain form
//! producers send (ints as JSON integers or digit strings, a plain decimal price, short ASCII
//! strings without escapes, `event_time` in one of three exact forms). For such a message it
//! builds exactly the bytes `route` would (the validated event's JSON, its key, its session
//! feature field). For anything else, valid or not, it answers "not mine" and the validator
//! routes the message with `route` itself: this code never rejects an event, so it cannot
//! disagree with the contract on an error. tests/test_native_route.py checks, on generated and
//! adversarial inputs, that every message it accepts gets the same output from `route`.
//!
//! Why it exists: per event, Python's routing and bookkeeping cost ~45 µs of interpreter time
//! against the passthrough's ~7, and the validator's threads share one GIL (benchmarks/README.md,
//! "The validator: where the time goes").

use std::collections::HashMap;
use std::fmt::Write as _;

use blake2::digest::{Update, VariableOutput};
use blake2::Blake2bVar;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

// The limits of easymlops.schema (MAX_MESSAGE_BYTES, MAX_STRING_LENGTH, MIN_EVENT_TIME's year).
const MAX_MESSAGE_BYTES: usize = 64 * 1024;
const MAX_STRING_LENGTH: usize = 256;
const MIN_YEAR: i64 = 2000;
// Beyond these the message is left to Python, whose parsers decide (nesting limits, number
// literals of thousands of digits).
const MAX_DEPTH: usize = 32;
const MAX_NUMBER_LENGTH: usize = 64;
// easymlops.session_features.FUNNEL_RANK, in EVENT_TYPES order.
const EVENT_TYPES: [&[u8]; 4] = [b"view", b"cart", b"remove_from_cart", b"purchase"];

/// A value of one of the contract's fields, as far as the fast path cares.
#[derive(Clone, Copy)]
enum Value<'a> {
    /// A string without escapes, all ASCII (the raw bytes between the quotes).
    Plain(&'a [u8]),
    /// A JSON number literal, as written.
    Number(&'a [u8]),
    Null,
    /// Anything else (escaped or non-ASCII string, bool, object, array): Python decides.
    Other,
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Parser<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            Some(())
        } else {
            None
        }
    }

    /// A string at `self.i` (its opening quote): the raw bytes between the quotes and whether
    /// they hold an escape. Checks the JSON grammar (escapes, no raw control characters).
    fn string(&mut self) -> Option<(&'a [u8], bool)> {
        self.i += 1;
        let start = self.i;
        let mut escaped = false;
        loop {
            match *self.b.get(self.i)? {
                b'"' => {
                    let text = &self.b[start..self.i];
                    self.i += 1;
                    return Some((text, escaped));
                }
                b'\\' => {
                    escaped = true;
                    match *self.b.get(self.i + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 2,
                        b'u' => {
                            let hex = self.b.get(self.i + 2..self.i + 6)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            self.i += 6;
                        }
                        _ => return None,
                    }
                }
                0..=0x1f => return None,
                _ => self.i += 1,
            }
        }
    }

    /// A number literal per RFC 8259.
    fn number(&mut self) -> Option<&'a [u8]> {
        let start = self.i;
        let digits = |p: &mut Self| {
            let s = p.i;
            while p.b.get(p.i).is_some_and(u8::is_ascii_digit) {
                p.i += 1;
            }
            p.i > s
        };
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        match self.b.get(self.i) {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return None,
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if !digits(self) {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.b.get(self.i) {
            self.i += 1;
            if let Some(b'+' | b'-') = self.b.get(self.i) {
                self.i += 1;
            }
            if !digits(self) {
                return None;
            }
        }
        let text = &self.b[start..self.i];
        (text.len() <= MAX_NUMBER_LENGTH).then_some(text)
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if self.b.get(self.i..self.i + word.len())? == word {
            self.i += word.len();
            Some(())
        } else {
            None
        }
    }

    /// Any JSON value; None when it breaks the grammar or nests deeper than MAX_DEPTH.
    fn value(&mut self, depth: usize) -> Option<Value<'a>> {
        self.ws();
        match *self.b.get(self.i)? {
            b'"' => {
                let (text, escaped) = self.string()?;
                Some(if escaped || !text.is_ascii() {
                    Value::Other
                } else {
                    Value::Plain(text)
                })
            }
            b'-' | b'0'..=b'9' => self.number().map(Value::Number),
            b'n' => self.literal(b"null").map(|_| Value::Null),
            b't' => self.literal(b"true").map(|_| Value::Other),
            b'f' => self.literal(b"false").map(|_| Value::Other),
            b'[' | b'{' if depth >= MAX_DEPTH => None,
            b'[' => {
                self.i += 1;
                self.ws();
                if self.b.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Some(Value::Other);
                }
                loop {
                    self.value(depth + 1)?;
                    self.ws();
                    match *self.b.get(self.i)? {
                        b',' => self.i += 1,
                        b']' => {
                            self.i += 1;
                            return Some(Value::Other);
                        }
                        _ => return None,
                    }
                }
            }
            b'{' => {
                self.i += 1;
                self.ws();
                if self.b.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Some(Value::Other);
                }
                loop {
                    self.ws();
                    if self.b.get(self.i) != Some(&b'"') {
                        return None;
                    }
                    self.string()?;
                    self.eat(b':')?;
                    self.value(depth + 1)?;
                    self.ws();
                    match *self.b.get(self.i)? {
                        b',' => self.i += 1,
                        b'}' => {
                            self.i += 1;
                            return Some(Value::Other);
                        }
                        _ => return None,
                    }
                }
            }
            _ => None,
        }
    }
}

#[derive(Default)]
struct Fields<'a> {
    event_time: Option<Value<'a>>,
    event_type: Option<Value<'a>>,
    product_id: Option<Value<'a>>,
    category_id: Option<Value<'a>>,
    price: Option<Value<'a>>,
    user_id: Option<Value<'a>>,
    user_session: Option<Value<'a>>,
    category_code: Option<Value<'a>>,
    brand: Option<Value<'a>>,
    event_id: Option<Value<'a>>,
}

/// The contract's fields of a JSON object; None if the bytes are not one, or a key has an
/// escape or appears twice (Python decides those).
fn fields(payload: &[u8]) -> Option<Fields<'_>> {
    let mut p = Parser { b: payload, i: 0 };
    let mut f = Fields::default();
    p.eat(b'{')?;
    p.ws();
    if p.b.get(p.i) == Some(&b'}') {
        return None; // no fields: missing_field
    }
    loop {
        p.ws();
        if p.b.get(p.i) != Some(&b'"') {
            return None;
        }
        let (key, escaped) = p.string()?;
        if escaped {
            return None;
        }
        p.eat(b':')?;
        let value = p.value(1)?;
        let slot = match key {
            b"event_time" => &mut f.event_time,
            b"event_type" => &mut f.event_type,
            b"product_id" => &mut f.product_id,
            b"category_id" => &mut f.category_id,
            b"price" => &mut f.price,
            b"user_id" => &mut f.user_id,
            b"user_session" => &mut f.user_session,
            b"category_code" => &mut f.category_code,
            b"brand" => &mut f.brand,
            b"event_id" => &mut f.event_id,
            _ => &mut None,
        };
        if slot.is_some() {
            return None;
        }
        *slot = Some(value);
        p.ws();
        match *p.b.get(p.i)? {
            b',' => p.i += 1,
            b'}' => {
                p.i += 1;
                break;
            }
            _ => return None,
        }
    }
    p.ws();
    (p.i == payload.len()).then_some(f)
}

fn all_digits(text: &[u8]) -> bool {
    !text.is_empty() && text.iter().all(u8::is_ascii_digit)
}

/// An int64 field in a plain form: a JSON integer or a string of at most 19 digits, in range.
fn int_field(value: Option<Value>) -> Option<i64> {
    let text = match value? {
        Value::Number(t) | Value::Plain(t) => t,
        _ => return None,
    };
    let digits = text.strip_prefix(b"-").unwrap_or(text);
    if !all_digits(digits) || digits.len() > 19 {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok() // None when out of int64's range
}

/// The price in a plain form (digits, optionally a point and digits; a JSON number or a
/// string), with its text as Python prints the float, or None. Kept to magnitudes that both
/// Python's repr and ryu print without an exponent, and to 17 characters (exactly rounded by
/// every parser involved).
fn price_field(value: Option<Value>) -> Option<(f64, String)> {
    let text = match value? {
        Value::Number(t) | Value::Plain(t) => t,
        _ => return None,
    };
    if text.len() > 17 {
        return None;
    }
    let (whole, fraction) = match text.iter().position(|&c| c == b'.') {
        Some(dot) => (&text[..dot], Some(&text[dot + 1..])),
        None => (text, None),
    };
    if !all_digits(whole) || fraction.is_some_and(|f| !all_digits(f)) {
        return None;
    }
    let price: f64 = std::str::from_utf8(text).ok()?.parse().ok()?;
    if !(price == 0.0 || (1e-4..1e15).contains(&price)) {
        return None;
    }
    let mut buffer = ryu::Buffer::new();
    let printed = buffer.format_finite(price);
    if printed.contains('e') {
        return None;
    }
    Some((price, printed.to_owned()))
}

/// A plain string field: ASCII, no escapes, at most MAX_STRING_LENGTH characters.
fn plain(value: Value<'_>) -> Option<&[u8]> {
    match value {
        Value::Plain(t) if t.len() <= MAX_STRING_LENGTH => Some(t),
        _ => None,
    }
}

/// An optional string field: absent, null or "" mean none.
fn optional(value: Option<Value<'_>>) -> Option<Option<&[u8]>> {
    match value {
        None | Some(Value::Null) => Some(None),
        Some(v) => {
            let text = plain(v)?;
            Some((!text.is_empty()).then_some(text))
        }
    }
}

fn number(text: &[u8]) -> Option<i64> {
    std::str::from_utf8(text).ok()?.parse().ok()
}

fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    // Howard Hinnant's algorithm: days since 1970-01-01 of a proleptic Gregorian date.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `event_time` in one of three exact forms: `YYYY-MM-DDTHH:MM:SS[.fff|.ffffff]` with `Z`,
/// `+00:00` or nothing (UTC), and the public dataset's `YYYY-MM-DD HH:MM:SS UTC`. Returns
/// microseconds since the epoch and the date-time fields.
fn event_time(text: &[u8]) -> Option<(i64, [i64; 7])> {
    if text.len() < 19 || text[4] != b'-' || text[7] != b'-' || text[13] != b':' {
        return None;
    }
    if text[16] != b':' {
        return None;
    }
    let rest = &text[19..];
    let micros: i64 = match text[10] {
        b' ' if rest == b" UTC" => 0,
        b'T' => {
            let (fraction, zone) = match rest.first() {
                Some(b'.') => {
                    let n = rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
                    (&rest[1..1 + n], &rest[1 + n..])
                }
                _ => (&rest[..0], rest),
            };
            if !matches!(zone, b"" | b"Z" | b"+00:00") {
                return None;
            }
            match fraction.len() {
                0 => 0,
                3 => number(fraction)? * 1000,
                6 => number(fraction)?,
                _ => return None,
            }
        }
        _ => return None,
    };
    let part = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = &text[range];
        if all_digits(digits) {
            number(digits)
        } else {
            None
        }
    };
    let (year, month, day) = (part(0..4)?, part(5..7)?, part(8..10)?);
    let (hour, minute, second) = (part(11..13)?, part(14..16)?, part(17..19)?);
    if year < MIN_YEAR || !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month)
    {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    Some((
        seconds * 1_000_000 + micros,
        [year, month, day, hour, minute, second, micros],
    ))
}

/// What `route` builds for a valid event.
struct Valid<'a> {
    json: Vec<u8>,
    user_session: &'a [u8],
    field: String,
    field_value: String,
}

fn push_string(out: &mut Vec<u8>, text: &[u8]) {
    out.push(b'"');
    out.extend_from_slice(text);
    out.push(b'"');
}

fn push_optional(out: &mut Vec<u8>, text: Option<&[u8]>) {
    match text {
        Some(t) => push_string(out, t),
        None => out.extend_from_slice(b"null"),
    }
}

/// The fast path for one message value: Some when it is a valid event in plain form.
/// `latest_micros` is the validator's clock plus MAX_FUTURE.
fn route_plain(payload: &[u8], latest_micros: i64) -> Option<Valid<'_>> {
    if payload.len() > MAX_MESSAGE_BYTES || std::str::from_utf8(payload).is_err() {
        return None;
    }
    let f = fields(payload)?;
    let event_type = plain(f.event_type?)?;
    let rank = EVENT_TYPES.iter().position(|&t| t == event_type)?;
    let (micros, [year, month, day, hour, minute, second, fraction]) =
        event_time(plain(f.event_time?)?)?;
    if micros > latest_micros {
        return None;
    }
    let product_id = int_field(f.product_id)?;
    let category_id = int_field(f.category_id)?;
    let user_id = int_field(f.user_id)?;
    let (_, price) = price_field(f.price)?;
    let user_session = plain(f.user_session?)?;
    if user_session.iter().all(|&c| c == b' ') {
        return None; // blank: missing_field
    }
    let category_code = optional(f.category_code)?;
    let brand = optional(f.brand)?;
    let given_id = optional(f.event_id)?;
    let mut time = String::with_capacity(27);
    write!(
        time,
        "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{fraction:06}Z"
    )
    .ok()?;
    let session = std::str::from_utf8(user_session).ok()?;
    let event_type_text = std::str::from_utf8(event_type).ok()?;
    let derived;
    let event_id: &[u8] = match given_id {
        Some(id) => id,
        None => {
            // easymlops.schema.derive_event_id
            let key = format!("{time}|{event_type_text}|{product_id}|{user_id}|{session}|{price}");
            let mut hasher = Blake2bVar::new(16).ok()?;
            hasher.update(key.as_bytes());
            let mut digest = [0u8; 16];
            hasher.finalize_variable(&mut digest).ok()?;
            derived = digest.iter().fold(String::with_capacity(32), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            });
            derived.as_bytes()
        }
    };
    let mut json = Vec::with_capacity(payload.len() + 64);
    json.extend_from_slice(b"{\"event_id\":");
    push_string(&mut json, event_id);
    json.extend_from_slice(b",\"event_time\":");
    push_string(&mut json, time.as_bytes());
    json.extend_from_slice(b",\"event_type\":");
    push_string(&mut json, event_type);
    write!(
        VecWriter(&mut json),
        ",\"product_id\":{product_id},\"category_id\":{category_id},\"category_code\":"
    )
    .ok()?;
    push_optional(&mut json, category_code);
    json.extend_from_slice(b",\"brand\":");
    push_optional(&mut json, brand);
    write!(
        VecWriter(&mut json),
        ",\"price\":{price},\"user_id\":{user_id},\"user_session\":"
    )
    .ok()?;
    push_string(&mut json, user_session);
    json.push(b'}');
    // easymlops.session_features.event_field
    let field = format!("e:{}", std::str::from_utf8(event_id).ok()?);
    let field_value = format!("{micros}|{rank}|{product_id}");
    Some(Valid {
        json,
        user_session,
        field,
        field_value,
    })
}

struct VecWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// One message value through the fast path (for tests and tools): None when Python must route
/// it, else (the validated event's JSON, its key, its session field, the field's value).
#[pyfunction]
fn route_payload<'py>(
    py: Python<'py>,
    payload: &[u8],
    latest_micros: i64,
) -> Option<(Bound<'py, PyBytes>, Bound<'py, PyBytes>, String, String)> {
    let valid = route_plain(payload, latest_micros)?;
    Some((
        PyBytes::new(py, &valid.json),
        PyBytes::new(py, valid.user_session),
        valid.field,
        valid.field_value,
    ))
}

/// A consumed batch after the fast path. Per routed record (every message without an error, in
/// order): `values`, `keys` (None where Python must route it), `valid`, `sources`
/// ("<partition>:<offset>"), `upstream` (its traceparent header or None).
#[pyclass(get_all, module = "easymlops_native")]
struct FastBatch {
    values: Py<PyList>,
    keys: Py<PyList>,
    valid: Py<PyList>,
    sources: Py<PyList>,
    upstream: Py<PyList>,
    /// Per raw partition, the offset after its last record.
    next_offsets: Py<PyDict>,
    /// (record index, message index) of each record left to Python.
    fallback: Py<PyList>,
    /// Indices of the messages that carry an error instead of a record.
    failed: Py<PyList>,
    /// (user_session, field, value) of each valid event's session-feature field.
    session_fields: Py<PyList>,
    /// Records per upstream traceparent.
    traces: Py<PyDict>,
    /// Valid events routed here.
    fast_valid: usize,
}

/// Route a list of confluent_kafka Messages: the fast path for each, and the per-record
/// bookkeeping the validator needs (sources, offsets, trace headers).
#[pyfunction]
fn route_messages<'py>(
    py: Python<'py>,
    messages: &Bound<'py, PyList>,
    latest_micros: i64,
    trace_header: &str,
) -> PyResult<FastBatch> {
    let n = messages.len();
    let values = PyList::empty(py);
    let keys = PyList::empty(py);
    let valid = PyList::empty(py);
    let sources = PyList::empty(py);
    let upstream = PyList::empty(py);
    let next_offsets = PyDict::new(py);
    let fallback = PyList::empty(py);
    let failed = PyList::empty(py);
    let session_fields = PyList::empty(py);
    let traces = PyDict::new(py);
    let mut offsets: Vec<(i64, i64)> = Vec::new();
    let mut fast_valid = 0;
    let none = py.None().into_bound(py);
    let mut source = String::with_capacity(24);
    for index in 0..n {
        let message = messages.get_item(index)?;
        if !message.call_method0(intern!(py, "error"))?.is_none() {
            failed.append(index)?;
            continue;
        }
        let record = values.len();
        let partition: i64 = message.call_method0(intern!(py, "partition"))?.extract()?;
        let offset: i64 = message.call_method0(intern!(py, "offset"))?.extract()?;
        source.clear();
        let _ = write!(source, "{partition}:{offset}");
        sources.append(PyBytes::new(py, source.as_bytes()))?;
        match offsets.iter_mut().find(|(p, _)| *p == partition) {
            Some(entry) => entry.1 = offset + 1,
            None => offsets.push((partition, offset + 1)),
        }
        let mut parent = none.clone();
        let headers = message.call_method0(intern!(py, "headers"))?;
        if !headers.is_none() {
            for header in headers.try_iter()? {
                let header = header?;
                let header = header.cast::<PyTuple>()?;
                let value = header.get_item(1)?;
                if !value.is_none()
                    && header.get_item(0)?.cast::<PyString>()?.to_str()? == trace_header
                {
                    let seen: usize = match traces.get_item(&value)? {
                        Some(count) => count.extract()?,
                        None => 0,
                    };
                    traces.set_item(&value, seen + 1)?;
                    parent = value;
                }
            }
        }
        upstream.append(parent)?;
        let payload = message.call_method0(intern!(py, "value"))?;
        let routed = match payload.cast::<PyBytes>() {
            Ok(bytes) => route_plain(bytes.as_bytes(), latest_micros),
            Err(_) => None,
        };
        match routed {
            Some(event) => {
                values.append(PyBytes::new(py, &event.json))?;
                keys.append(PyBytes::new(py, event.user_session))?;
                valid.append(true)?;
                let session = std::str::from_utf8(event.user_session).unwrap_or_default();
                session_fields.append((session, event.field, event.field_value))?;
                fast_valid += 1;
            }
            None => {
                values.append(&none)?;
                keys.append(&none)?;
                valid.append(false)?;
                fallback.append((record, index))?;
            }
        }
    }
    for (partition, next) in offsets {
        next_offsets.set_item(partition, next)?;
    }
    Ok(FastBatch {
        values: values.unbind(),
        keys: keys.unbind(),
        valid: valid.unbind(),
        sources: sources.unbind(),
        upstream: upstream.unbind(),
        next_offsets: next_offsets.unbind(),
        fallback: fallback.unbind(),
        failed: failed.unbind(),
        session_fields: session_fields.unbind(),
        traces: traces.unbind(),
        fast_valid,
    })
}

/// The Redis commands that store session-feature fields, as RESP bytes: EVAL of `script`
/// (easymlops.session_features.STORE_EVENTS_LUA) with the same keys and arguments, and the same
/// grouping by session and split at `per_call` events, as SessionFeatureWriter.apply builds.
#[pyfunction]
fn pack_session_writes<'py>(
    py: Python<'py>,
    session_fields: &Bound<'py, PyList>,
    key_prefix: &str,
    ttl_seconds: i64,
    script: &str,
    per_call: usize,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let mut order: Vec<String> = Vec::new();
    let mut by_session: HashMap<String, Vec<String>> = HashMap::new();
    for entry in session_fields.iter() {
        let (session, field, value): (String, String, String) = entry.extract()?;
        let flat = match by_session.get_mut(&session) {
            Some(flat) => flat,
            None => {
                order.push(session.clone());
                by_session.entry(session).or_default()
            }
        };
        flat.push(field);
        flat.push(value);
    }
    let most = 2 * per_call.max(1);
    let mut commands = Vec::new();
    let mut keys: Vec<String> = Vec::new();
    let mut args: Vec<String> = vec![ttl_seconds.to_string()];
    let mut size = 0;
    let mut flush = |keys: &mut Vec<String>, args: &mut Vec<String>| {
        let mut command = Vec::new();
        let count = 3 + keys.len() + args.len();
        let _ = write!(VecWriter(&mut command), "*{count}\r\n");
        let number_of_keys = keys.len().to_string();
        for arg in ["EVAL", script, &number_of_keys]
            .into_iter()
            .chain(keys.iter().map(String::as_str))
            .chain(args.iter().map(String::as_str))
        {
            let _ = write!(VecWriter(&mut command), "${}\r\n", arg.len());
            command.extend_from_slice(arg.as_bytes());
            command.extend_from_slice(b"\r\n");
        }
        commands.push(PyBytes::new(py, &command));
        keys.clear();
        args.clear();
        args.push(ttl_seconds.to_string());
    };
    for session in &order {
        let flat = &by_session[session];
        for part in flat.chunks(most) {
            if size + part.len() > most {
                flush(&mut keys, &mut args);
                size = 0;
            }
            keys.push(format!("{key_prefix}{session}"));
            args.push((part.len() / 2).to_string());
            args.extend(part.iter().cloned());
            size += part.len();
        }
    }
    if !keys.is_empty() {
        flush(&mut keys, &mut args);
    }
    Ok(commands)
}

#[pymodule]
fn easymlops_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(route_payload, m)?)?;
    m.add_function(wrap_pyfunction!(route_messages, m)?)?;
    m.add_function(wrap_pyfunction!(pack_session_writes, m)?)?;
    m.add_class::<FastBatch>()?;
    Ok(())
}
