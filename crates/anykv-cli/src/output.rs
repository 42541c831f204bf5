//! How values, pairs and events are printed: raw values for `get`, escaped
//! one-line text for tables, and a lossless JSON encoding.
//!
//! JSON encoding of a value: `"value"` holds it as a JSON string when it is
//! valid UTF-8, otherwise `"value_hex"` holds its bytes in lowercase hex.
//! Exactly one of the two is present, so nothing is lost and no base64 is
//! needed to read it back.

use std::{
    fmt::Write as _,
    io::{self, Write},
};

use anykv::{Capabilities, Event, KvPair, SnapshotMode, WatchHistory, registry::Driver};
use serde::Serialize;

/// Longest value preview in `list`, in characters of the escaped text.
pub const PREVIEW_CHARS: usize = 60;

/// A value in JSON: text when it is UTF-8, hex otherwise.
#[derive(Serialize)]
pub struct JsonValue {
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_hex: Option<String>,
}

impl JsonValue {
    /// Encodes `bytes`.
    pub fn new(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(s) => JsonValue {
                value: Some(s.to_owned()),
                value_hex: None,
            },
            Err(_) => JsonValue {
                value: None,
                value_hex: Some(hex(bytes)),
            },
        }
    }

    /// Decodes the two fields back into bytes (the inverse of [`new`](Self::new)):
    /// exactly one must be present, `value_hex` must be lowercase or
    /// uppercase hex of even length.
    pub fn decode(value: Option<String>, value_hex: Option<String>) -> Result<Vec<u8>, String> {
        match (value, value_hex) {
            (Some(text), None) => Ok(text.into_bytes()),
            (None, Some(h)) => unhex(&h),
            (Some(_), Some(_)) => Err("has both \"value\" and \"value_hex\"".to_owned()),
            (None, None) => Err("has neither \"value\" nor \"value_hex\"".to_owned()),
        }
    }
}

/// A pair in JSON (`get --json`, `list --json`).
#[derive(Serialize)]
pub struct JsonPair<'a> {
    key: &'a str,
    version: u64,
    create_revision: u64,
    mod_revision: u64,
    #[serde(flatten)]
    value: JsonValue,
}

impl<'a> JsonPair<'a> {
    /// Encodes a pair.
    pub fn new(kv: &'a KvPair) -> Self {
        JsonPair {
            key: kv.key.as_str(),
            version: kv.version.get(),
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            value: JsonValue::new(&kv.value),
        }
    }
}

/// A watch event in JSON (`watch --json`).
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum JsonEvent<'a> {
    Put {
        key: &'a str,
        revision: u64,
        version: u64,
        #[serde(flatten)]
        value: JsonValue,
    },
    Delete {
        key: &'a str,
        revision: u64,
    },
}

/// Escapes a value onto one line: `\\`, `\n`, `\r`, `\t`, `\u{..}` for other
/// control characters, `\xNN` for bytes that are not UTF-8.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() => {
                    let _ = write!(out, "\\u{{{:x}}}", c as u32);
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// The escaped value cut to `max` characters, with `…` when cut.
pub fn preview(bytes: &[u8], max: usize) -> String {
    let escaped = escape(bytes);
    match escaped.char_indices().nth(max) {
        None => escaped,
        Some((cut, _)) => format!("{}…", &escaped[..cut]),
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Decodes hex digits (either case) into bytes.
fn unhex(text: &str) -> Result<Vec<u8>, String> {
    let digits = text.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return Err(format!(
            "value_hex has an odd number of digits ({})",
            digits.len()
        ));
    }
    let nibble = |i: usize| match digits[i] {
        d @ b'0'..=b'9' => Ok(d - b'0'),
        d @ b'a'..=b'f' => Ok(d - b'a' + 10),
        d @ b'A'..=b'F' => Ok(d - b'A' + 10),
        _ => Err(format!(
            "value_hex has a non-hex character {:?} at offset {i}",
            text.get(i..).and_then(|t| t.chars().next()).unwrap_or('?')
        )),
    };
    let mut out = Vec::with_capacity(digits.len() / 2);
    for i in (0..digits.len()).step_by(2) {
        out.push((nibble(i)? << 4) | nibble(i + 1)?);
    }
    Ok(out)
}

/// One `list` line: `KEY \t VERSION \t PREVIEW`.
pub fn list_line(kv: &KvPair) -> String {
    format!(
        "{}\t{}\t{}",
        kv.key,
        kv.version,
        preview(&kv.value, PREVIEW_CHARS)
    )
}

/// One `watch` line (text or JSON).
pub fn event_line(event: &Event, json: bool) -> String {
    if json {
        let e = match event {
            Event::Put { kv, .. } => JsonEvent::Put {
                key: kv.key.as_str(),
                revision: kv.mod_revision,
                version: kv.version.get(),
                value: JsonValue::new(&kv.value),
            },
            Event::Delete { key, revision } => JsonEvent::Delete {
                key: key.as_str(),
                revision: *revision,
            },
        };
        to_json(&e)
    } else {
        match event {
            Event::Put { kv, .. } => {
                format!(
                    "put\t{}\t{}\t{}",
                    kv.key,
                    kv.mod_revision,
                    escape(&kv.value)
                )
            }
            Event::Delete { key, revision } => format!("delete\t{key}\t{revision}"),
        }
    }
}

/// Serialises to compact JSON. Our types only hold strings and integers,
/// which cannot fail to serialise; the fallback keeps that a non-panic.
pub fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":{:?}}}", e.to_string()))
}

/// A driver's capabilities in words, for `anykv drivers`.
pub fn capabilities_line(c: &Capabilities) -> String {
    let ttl = match c.ttl {
        Some(g) => format!("ttl (within {})", humantime::format_duration(g)),
        None => "no ttl".to_owned(),
    };
    let watch = match c.watch_history {
        WatchHistory::Full => "watch with full history",
        WatchHistory::Converge => "watch converges after gaps",
    };
    let locks = match (c.locks, c.cross_process_locks) {
        (false, _) => "no locks",
        (true, false) => "in-process locks",
        (true, true) => "cross-process locks",
    };
    let atomic = match c.max_atomic_ops {
        Some(n) => format!("atomic up to {n} ops"),
        None => "atomic unbounded".to_owned(),
    };
    let durable = if c.durable { "durable" } else { "not durable" };
    let snapshot = match c.snapshot {
        Some(mode) => format!("{} snapshot", snapshot_mode(mode)),
        None => "no snapshot".to_owned(),
    };
    let sessions = match (c.sessions, c.cross_process_sessions) {
        (None, _) => "no sessions",
        (Some(_), false) => "in-process sessions",
        (Some(_), true) => "cross-process sessions",
    };
    format!(
        "max value {}, {ttl}, {watch}, {locks}, {atomic}, {durable}, {snapshot}, {sessions}",
        size(c.max_value_size)
    )
}

/// `atomic` or `verified`: how a backend's `snapshot` reads (as in `drivers
/// --json` and the `anykv dump` header).
pub fn snapshot_mode(mode: SnapshotMode) -> &'static str {
    match mode {
        SnapshotMode::Atomic => "atomic",
        SnapshotMode::Verified => "verified",
    }
}

fn size(bytes: usize) -> String {
    const MIB: usize = 1 << 20;
    const KIB: usize = 1 << 10;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes >= KIB && bytes.is_multiple_of(KIB) {
        format!("{} KiB", bytes / KIB)
    } else {
        format!("{bytes} B")
    }
}

/// A driver in JSON (`drivers --json`).
#[derive(Serialize)]
pub struct JsonDriver {
    name: &'static str,
    schemes: &'static [&'static str],
    description: &'static str,
    params: &'static [&'static str],
    capabilities: JsonCapabilities,
}

#[derive(Serialize)]
struct JsonCapabilities {
    max_value_size: usize,
    ttl_granularity_ms: Option<u128>,
    watch_history: &'static str,
    locks: bool,
    cross_process_locks: bool,
    max_atomic_ops: Option<usize>,
    durable: bool,
    /// `"atomic"`, `"verified"` or null (no snapshot: `dump` is not consistent).
    snapshot: Option<&'static str>,
    /// Null: no sessions (`elect` and `register` are refused); otherwise
    /// how late past its TTL a dead session's keys may go.
    sessions_granularity_ms: Option<u128>,
    cross_process_sessions: bool,
}

impl JsonDriver {
    /// Describes a registered driver.
    pub fn new(d: &'static Driver) -> Self {
        let c = (d.capabilities)();
        JsonDriver {
            name: d.name,
            schemes: d.schemes,
            description: d.description,
            params: d.params,
            capabilities: JsonCapabilities {
                max_value_size: c.max_value_size,
                ttl_granularity_ms: c.ttl.map(|t| t.as_millis()),
                watch_history: match c.watch_history {
                    WatchHistory::Full => "full",
                    WatchHistory::Converge => "converge",
                },
                locks: c.locks,
                cross_process_locks: c.cross_process_locks,
                max_atomic_ops: c.max_atomic_ops,
                durable: c.durable,
                snapshot: c.snapshot.map(snapshot_mode),
                sessions_granularity_ms: c.sessions.map(|g| g.as_millis()),
                cross_process_sessions: c.cross_process_sessions,
            },
        }
    }
}

/// Writes `line` and a newline to stdout and flushes, so that a consumer of
/// a pipe (`watch | …`) sees each line at once.
pub fn println(line: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(line.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Whether `get` adds a newline after `value`: only for a terminal (so the
/// prompt starts on its own line), never when piped or redirected (the
/// output is then exactly the value), and not after a value that ends with one.
pub fn newline_after(value: &[u8], stdout_is_terminal: bool) -> bool {
    stdout_is_terminal && !value.ends_with(b"\n")
}

/// Writes raw bytes to stdout (no newline added).
pub fn write_raw(bytes: &[u8]) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_adds_a_newline_only_on_a_terminal() {
        assert!(newline_after(b"v", true));
        assert!(newline_after(b"", true));
        assert!(!newline_after(b"v\n", true));
        assert!(!newline_after(b"v", false));
        assert!(!newline_after(b"", false));
    }

    #[test]
    fn escapes_are_one_line_and_mark_bad_bytes() {
        assert_eq!(escape(b"plain text"), "plain text");
        assert_eq!(escape(b"a\nb\tc\\d\re"), "a\\nb\\tc\\\\d\\re");
        assert_eq!(escape(b"\x01\x7f"), "\\u{1}\\u{7f}");
        assert_eq!(escape(b"ok\xff\xfeok"), "ok\\xff\\xfeok");
        assert_eq!(escape("é€".as_bytes()), "é€");
    }

    #[test]
    fn preview_cuts_on_characters() {
        assert_eq!(preview(b"abcdef", 3), "abc…");
        assert_eq!(preview(b"abc", 3), "abc");
        assert_eq!(preview("ééé".as_bytes(), 2), "éé…");
    }

    #[test]
    fn json_value_is_text_or_hex() {
        assert_eq!(to_json(&JsonValue::new(b"hi\n")), r#"{"value":"hi\n"}"#);
        assert_eq!(
            to_json(&JsonValue::new(b"\xff\x00")),
            r#"{"value_hex":"ff00"}"#
        );
        assert_eq!(to_json(&JsonValue::new(b"")), r#"{"value":""}"#);
    }

    #[test]
    fn json_value_decodes_what_it_encodes() {
        let bytes: Vec<u8> = (0..=255u8).collect();
        for v in [&b""[..], b"text\n\"q\"", &bytes] {
            let JsonValue { value, value_hex } = JsonValue::new(v);
            assert_eq!(JsonValue::decode(value, value_hex).as_deref(), Ok(v));
        }
        assert_eq!(
            JsonValue::decode(None, Some("FF00".into())),
            Ok(vec![0xff, 0])
        );
        let odd = JsonValue::decode(None, Some("abc".into())).unwrap_err();
        assert!(odd.contains("odd number"), "{odd}");
        let bad = JsonValue::decode(None, Some("zz".into())).unwrap_err();
        assert!(bad.contains("non-hex character 'z' at offset 0"), "{bad}");
        let multibyte = JsonValue::decode(None, Some("é".into())).unwrap_err();
        assert!(multibyte.contains("non-hex"), "{multibyte}");
        assert!(JsonValue::decode(None, None).is_err());
        assert!(JsonValue::decode(Some(String::new()), Some(String::new())).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(size(16 << 20), "16 MiB");
        assert_eq!(size(512 * 1024), "512 KiB");
        assert_eq!(size(1000), "1000 B");
    }
}
