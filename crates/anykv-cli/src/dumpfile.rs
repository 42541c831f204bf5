//! The dump file format shared by `anykv dump` and `anykv restore`: JSON
//! lines, a header first, one line per pair, an end line last.
//!
//! ```text
//! {"format":"anykv-dump","version":1,"backend":"redb","revision":42,"consistent":true,"snapshot":"atomic","prefix":"config","created":"2026-11-30T04:20:00Z"}
//! {"key":"a","value":"text"}
//! {"key":"b/c","value_hex":"ff00"}
//! {"end":true,"count":2}
//! ```
//!
//! - Keys are relative to the dumped prefix (`config/a` is written `a`),
//!   so a dump restores under any prefix; the header's `prefix` is where it
//!   came from and where `restore` puts it unless told otherwise.
//! - Values are encoded as `list --json` does ([`JsonValue`]): `value` when
//!   valid UTF-8, else `value_hex`.
//! - `revision` is the store revision the pairs were read at (one
//!   `Store::snapshot`); `consistent` is false and `revision` null when the
//!   backend has no snapshot and the pairs were streamed by `export`
//!   (`note` says so).
//! - The end line carries the number of pairs: a file cut short (a full
//!   disk, a killed dump) has none and is refused by `restore`.

use std::io::{self, BufRead, Read};

use serde::{Deserialize, Serialize};

use crate::output::JsonValue;

/// The header's `format`.
pub const FORMAT: &str = "anykv-dump";
/// The header's `version`: the only one this build writes and reads.
pub const VERSION: u64 = 1;

/// The first line of a dump, as written.
#[derive(Debug, Serialize)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: &'static str,
    /// Always [`VERSION`].
    pub version: u64,
    /// The backend the pairs were read from (`redb`, `etcd`, …).
    pub backend: String,
    /// The store revision of the snapshot; null without one.
    pub revision: Option<u64>,
    /// Whether the pairs are the state at one revision.
    pub consistent: bool,
    /// How the snapshot read (`atomic`, `verified`), null without one.
    pub snapshot: Option<&'static str>,
    /// The dumped prefix (`""`: the whole namespace of the URL).
    pub prefix: String,
    /// When the dump was taken, RFC 3339 UTC.
    pub created: String,
    /// Why the dump is not consistent, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'static str>,
}

/// The header fields `restore` needs; others are informational.
#[derive(Debug, Deserialize)]
pub struct HeaderIn {
    /// Must be [`FORMAT`].
    pub format: Option<String>,
    /// Must be [`VERSION`].
    pub version: Option<u64>,
    /// The dumped prefix.
    pub prefix: Option<String>,
}

/// One pair, as written.
#[derive(Serialize)]
pub struct PairLine<'a> {
    /// Key relative to the dumped prefix.
    pub key: &'a str,
    /// The value, lossless.
    #[serde(flatten)]
    pub value: JsonValue,
}

/// The last line, as written.
#[derive(Serialize)]
pub struct EndLine {
    /// Always true.
    pub end: bool,
    /// Number of pair lines.
    pub count: u64,
}

/// A line after the header, as read: a pair or the end line. Unknown
/// fields are ignored; the value fields are decoded by [`JsonValue::decode`]
/// (not flattened, so a 16 MiB string is not buffered twice).
#[derive(Debug, Deserialize)]
pub struct LineIn {
    /// A pair's key.
    pub key: Option<String>,
    /// A pair's value as text.
    pub value: Option<String>,
    /// A pair's value as hex.
    pub value_hex: Option<String>,
    /// True on the end line.
    pub end: Option<bool>,
    /// The end line's pair count.
    pub count: Option<u64>,
}

/// Longest line read: the largest value any linked driver takes, escaped
/// at worst six bytes per byte (`\u0001`), plus room for the key. Longer
/// lines are refused before they are held in memory.
pub fn max_line() -> usize {
    let largest = anykv::drivers()
        .iter()
        .map(|d| (d.capabilities)().max_value_size)
        .max()
        .unwrap_or(16 << 20);
    largest.saturating_mul(6).saturating_add(64 << 10)
}

/// What reading one line gave.
pub enum Read1 {
    /// A line, without its `\n` (and `\r`).
    Line,
    /// The input ended.
    Eof,
    /// The line is longer than the limit.
    TooLong,
}

/// Reads one line into `buf` (cleared first), holding at most `limit` bytes.
pub fn read_line(input: &mut impl BufRead, buf: &mut Vec<u8>, limit: usize) -> io::Result<Read1> {
    buf.clear();
    let n = input
        .by_ref()
        .take(limit as u64 + 1)
        .read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(Read1::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    } else if n > limit {
        return Ok(Read1::TooLong);
    }
    Ok(Read1::Line)
}
