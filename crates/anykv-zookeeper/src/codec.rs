//! How a znode's data and stat say whether it is a key.
//!
//! * A value is stored as the znode's data, byte for byte, so other ZooKeeper
//!   clients (`zkCli.sh get`) read what anykv wrote and anykv reads what they
//!   wrote — an empty znode written by another client is a key with an empty
//!   value.
//! * A parent that anykv creates only so that a deeper key can exist holds
//!   the marker [`DIR`] (`\0anykv\0d`): such a znode is not a key.
//! * A key written with a TTL is a persistent-with-TTL znode whose data is
//!   `\0anykv\0t` + the TTL in milliseconds (8 bytes, big-endian) + the
//!   value. ZooKeeper reports TTL znodes to clients like plain persistent
//!   ones (`ephemeralOwner` 0), so the header is what tells anykv that the
//!   key expires and when: `now - mtime > ttl` (the server's own rule) hides
//!   it from reads before the server removes it.
//! * The rare value that itself starts with [`MAGIC`] is stored as
//!   `MAGIC + "v" + value`, so no value can be mistaken for a marker.

use std::{
    borrow::Cow,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anykv_core::{Bytes, Key, KvPair, Version};
use zookeeper_client::Stat;

/// Prefix of anykv's own data encodings: a NUL, `anykv`, a NUL.
pub(crate) const MAGIC: &[u8] = b"\0anykv\0";

/// Data of an implicit parent: not a key.
pub(crate) const DIR: &[u8] = b"\0anykv\0d";

/// Tag of an escaped value (a value that starts with [`MAGIC`]).
const ESCAPED: u8 = b'v';

/// Tag of a value with a TTL.
const TTL: u8 = b't';

/// Length of the TTL header: magic, tag, 8-byte TTL.
const TTL_HEADER: usize = MAGIC.len() + 1 + 8;

/// The znode data for `value`, with a TTL header if it has a TTL (borrowed
/// in the common case: a plain value is sent as it is).
pub(crate) fn encode(value: &[u8], ttl: Option<Duration>) -> Cow<'_, [u8]> {
    if let Some(ttl) = ttl {
        let mut out = Vec::with_capacity(TTL_HEADER + value.len());
        out.extend_from_slice(MAGIC);
        out.push(TTL);
        out.extend_from_slice(&(ttl.as_millis() as u64).to_be_bytes());
        out.extend_from_slice(value);
        return Cow::Owned(out);
    }
    if value.starts_with(MAGIC) {
        let mut out = Vec::with_capacity(MAGIC.len() + 1 + value.len());
        out.extend_from_slice(MAGIC);
        out.push(ESCAPED);
        out.extend_from_slice(value);
        Cow::Owned(out)
    } else {
        Cow::Borrowed(value)
    }
}

/// What znode data holds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// The implicit-parent marker.
    Dir,
    /// A value, with its TTL in milliseconds if it has one.
    Value(Bytes, Option<u64>),
}

/// Decodes znode data.
pub(crate) fn decode(mut data: Vec<u8>) -> Decoded {
    if !data.starts_with(MAGIC) {
        return Decoded::Value(Bytes::from(data), None);
    }
    if data == DIR {
        return Decoded::Dir;
    }
    if let Some(ttl) = ttl_of(&data) {
        data.drain(..TTL_HEADER);
        return Decoded::Value(Bytes::from(data), Some(ttl));
    }
    if data.get(MAGIC.len()) == Some(&ESCAPED) {
        data.drain(..=MAGIC.len());
    }
    // Anything else that merely starts with the magic bytes was written by
    // another client: it is a plain value.
    Decoded::Value(Bytes::from(data), None)
}

/// The TTL in milliseconds of data written with a TTL.
pub(crate) fn ttl_of(data: &[u8]) -> Option<u64> {
    if !data.starts_with(MAGIC) || data.get(MAGIC.len()) != Some(&TTL) {
        return None;
    }
    let ttl: [u8; 8] = data.get(MAGIC.len() + 1..TTL_HEADER)?.try_into().ok()?;
    Some(u64::from_be_bytes(ttl))
}

/// Milliseconds since the epoch on this machine's clock.
pub(crate) fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// True when a TTL's time is up (the server's rule: not modified for longer
/// than its TTL). Compared with this machine's clock: skew between client
/// and server shifts the moment a key disappears from reads.
fn expired(ttl_ms: u64, stat: &Stat, now_ms: i64) -> bool {
    now_ms - stat.mtime > ttl_ms as i64
}

/// What one znode is, for anykv.
#[derive(Debug, Clone)]
pub(crate) enum Node {
    /// A key with its value.
    Key(Bytes),
    /// An implicit parent or an expired TTL node: not a key.
    NotKey,
}

/// Classifies a znode read with its data and stat.
pub(crate) fn classify(data: Vec<u8>, stat: &Stat, now_ms: i64) -> Node {
    match decode(data) {
        Decoded::Dir => Node::NotKey,
        Decoded::Value(_, Some(ttl)) if expired(ttl, stat, now_ms) => Node::NotKey,
        Decoded::Value(v, _) => Node::Key(v),
    }
}

/// True when a znode is a key (without decoding its value).
pub(crate) fn is_key(data: &[u8], stat: &Stat, now_ms: i64) -> bool {
    data != DIR && !ttl_of(data).is_some_and(|ttl| expired(ttl, stat, now_ms))
}

/// The pair for a key read back, with versions from its stat: the version is
/// `mzxid` (store-wide, never reused for a key even across delete and
/// re-create), revisions are `czxid` / `mzxid`.
pub(crate) fn pair(key: Key, value: Bytes, stat: &Stat) -> KvPair {
    KvPair {
        key,
        value,
        version: Version::new(stat.mzxid as u64),
        create_revision: stat.czxid as u64,
        mod_revision: stat.mzxid as u64,
    }
}

/// The znode path of a key (`a/b` → `/a/b`).
pub(crate) fn path_of(key: &str) -> String {
    format!("/{key}")
}

/// The znode path of a prefix (`""` → `/`, `a/b` → `/a/b`).
pub(crate) fn prefix_path(prefix: &str) -> String {
    format!("/{prefix}")
}

/// The key of a znode path, `None` for the root, ZooKeeper's own `/zookeeper`
/// subtree, and names no anykv client could write.
pub(crate) fn key_of(path: &str) -> Option<Key> {
    let raw = path.strip_prefix('/')?;
    if is_system(path) {
        return None;
    }
    Key::from_backend(raw)
}

/// True for ZooKeeper's own `/zookeeper` subtree (quotas, config), which is
/// never a key and never listed, watched or deleted.
pub(crate) fn is_system(path: &str) -> bool {
    path == "/zookeeper" || path.starts_with("/zookeeper/")
}

/// `parent/name` for a znode path (`/` + `a` → `/a`).
pub(crate) fn child_path(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// The ancestors of a znode path, deepest first, without the root:
/// `/a/b/c` → `/a/b`, `/a`.
pub(crate) fn ancestors(path: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut p = path;
    while let Some(i) = p.rfind('/') {
        if i == 0 {
            break;
        }
        p = &p[..i];
        out.push(p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(mtime: i64) -> Stat {
        Stat {
            czxid: 1,
            mzxid: 2,
            pzxid: 1,
            ctime: 0,
            mtime,
            version: 0,
            cversion: 0,
            aversion: 0,
            ephemeral_owner: 0,
            data_length: 0,
            num_children: 0,
        }
    }

    fn value(data: Vec<u8>) -> Option<Vec<u8>> {
        match decode(data) {
            Decoded::Value(v, None) => Some(v.to_vec()),
            _ => None,
        }
    }

    #[test]
    fn values_round_trip_and_marker_is_not_a_value() {
        for v in [
            &b""[..],
            b"plain",
            MAGIC,
            DIR,
            b"\0anykv\0v",
            b"\0anykv\0x",
            b"\0anykv\0t12345678",
        ] {
            assert_eq!(
                value(encode(v, None).into_owned()).as_deref(),
                Some(v),
                "{v:?}"
            );
        }
        assert_eq!(decode(DIR.to_vec()), Decoded::Dir);
        assert_eq!(
            &encode(b"plain", None)[..],
            b"plain",
            "plain values are stored raw"
        );
        // Data another client wrote that happens to start with the magic bytes.
        assert_eq!(
            value(b"\0anykv\0zz".to_vec()).as_deref(),
            Some(&b"\0anykv\0zz"[..])
        );
    }

    #[test]
    fn ttl_header_and_expiry() {
        let data = encode(b"x", Some(Duration::from_millis(3000))).into_owned();
        assert_eq!(ttl_of(&data), Some(3000));
        assert_eq!(
            decode(data.clone()),
            Decoded::Value(Bytes::from_static(b"x"), Some(3000))
        );
        assert!(
            matches!(classify(data.clone(), &stat(1000), 4000), Node::Key(v) if &v[..] == b"x")
        );
        assert!(matches!(
            classify(data.clone(), &stat(1000), 4001),
            Node::NotKey
        ));
        assert!(!is_key(&data, &stat(1000), 4001));
        assert!(is_key(&data, &stat(1000), 4000));
        assert!(!is_key(DIR, &stat(0), 0));
        assert!(matches!(classify(Vec::new(), &stat(0), 9999), Node::Key(v) if v.is_empty()));
        assert_eq!(ttl_of(b"\0anykv\0t"), None, "a short header is not a TTL");
    }

    #[test]
    fn paths() {
        assert_eq!(ancestors("/a/b/c"), ["/a/b", "/a"]);
        assert!(ancestors("/a").is_empty());
        assert_eq!(child_path("/", "a"), "/a");
        assert_eq!(child_path("/a", "b"), "/a/b");
        assert_eq!(prefix_path(""), "/");
        assert_eq!(key_of("/a/b").map(Key::into_string).as_deref(), Some("a/b"));
        assert!(key_of("/zookeeper/quota").is_none());
        assert!(key_of("/").is_none());
    }
}
