//! Key and prefix rules, checked once here for every backend.
//!
//! A [`Key`] can only be built through these rules, so a driver never sees an
//! invalid key and no invalid key ever reaches the network.

use std::{borrow::Borrow, fmt, str::FromStr, sync::Arc};

use crate::error::{Error, Result};

/// Longest key, in bytes, as the caller writes it (without the namespace).
pub const MAX_KEY_LEN: usize = 1024;

/// First segment reserved for anykv's own bookkeeping (lock records).
///
/// A caller's key or prefix may not start with it; the namespace layer hides
/// keys under it from `list`, `keys`, `watch` and `export`.
pub const RESERVED_ROOT: &str = "__anykv";

/// A validated key: UTF-8, 1..=1024 bytes, `/`-separated segments, no leading
/// or trailing `/`, no empty, `.` or `..` segment, no control characters, and
/// not under the reserved root `__anykv`.
///
/// ```
/// use anykv_core::Key;
/// let k = Key::new("config/service-a/port")?;
/// assert_eq!(k.name(), "port");
/// assert!(Key::new("a//b").is_err());
/// assert!(Key::new("/a").is_err());
/// # Ok::<(), anykv_core::Error>(())
/// ```
///
/// Cloning a key is cheap (a shared string): pairs, events, watch targets
/// and the indexes that route events all hold the same key many times.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(Arc<str>);

/// A validated key prefix: the same rules as [`Key`], except that the empty
/// prefix is allowed and means "everything in this store's namespace".
///
/// Prefixes have directory semantics: `a` covers `a/b` but never `ab`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Prefix(String);

fn invalid(key: &str, reason: impl Into<String>) -> Error {
    // Keep errors readable even for megabyte-long garbage.
    let shown: String = key.chars().take(128).collect();
    Error::InvalidKey {
        key: shown,
        reason: reason.into(),
    }
}

/// Checks every rule but the reserved root and the length limit.
fn check_shape(s: &str) -> Result<()> {
    if s.starts_with('/') {
        return Err(invalid(s, "must not start with '/'"));
    }
    if s.ends_with('/') {
        return Err(invalid(s, "must not end with '/'"));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(invalid(
            s,
            format!("must not contain control character U+{:04X}", c as u32),
        ));
    }
    for seg in s.split('/') {
        match seg {
            "" => return Err(invalid(s, "must not contain an empty segment ('//')")),
            "." | ".." => return Err(invalid(s, "must not contain a '.' or '..' segment")),
            _ => {}
        }
    }
    Ok(())
}

fn check_user(s: &str) -> Result<()> {
    if s.len() > MAX_KEY_LEN {
        return Err(invalid(
            s,
            format!("is {} bytes, longer than {MAX_KEY_LEN}", s.len()),
        ));
    }
    check_shape(s)?;
    if s.split('/').next() == Some(RESERVED_ROOT) {
        return Err(invalid(
            s,
            format!("the top-level name {RESERVED_ROOT:?} is reserved"),
        ));
    }
    Ok(())
}

impl Key {
    /// Validates `key` against the key rules (`&str`, `String` or any
    /// string: it is checked in place and copied once, into the key).
    pub fn new(key: impl AsRef<str>) -> Result<Self> {
        let key = key.as_ref();
        if key.is_empty() {
            return Err(invalid(key, "must not be empty"));
        }
        check_user(key)?;
        Ok(Key(key.into()))
    }

    /// Builds a key from a name read back from a backend.
    ///
    /// Drivers use this for keys they list or watch: it accepts the reserved
    /// root and full-length namespaced keys, and returns `None` for names no
    /// anykv client could have written (a foreign tool's `a//b`), which drivers
    /// skip.
    pub fn from_backend(raw: &str) -> Option<Self> {
        (!raw.is_empty() && check_shape(raw).is_ok()).then(|| Key(raw.into()))
    }

    /// A key from a string known to hold a valid key (one taken from a
    /// `Key` earlier), without checking it again.
    pub(crate) fn trusted(raw: &str) -> Self {
        Key(raw.into())
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last segment.
    pub fn name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// The parent prefix (`a/b/c` → `a/b`; `a` → the empty prefix).
    pub fn parent(&self) -> Prefix {
        match self.0.rfind('/') {
            Some(i) => Prefix(self.0[..i].to_owned()),
            None => Prefix::default(),
        }
    }

    /// This key as a prefix covering the keys below it.
    pub fn as_prefix(&self) -> Prefix {
        Prefix(self.0.to_string())
    }

    /// `self/child`, without the length check (used for namespaced and
    /// bookkeeping keys, which may be longer than a caller's key).
    pub fn child(&self, name: &str) -> Key {
        Key(format!("{}/{name}", self.0).into())
    }

    /// The key anykv uses to keep the lock named `self` in `namespace`:
    /// `__anykv/locks/<namespace>/<key>`.
    pub fn lock_record(namespace: &Prefix, key: &Key) -> Key {
        Key(format!("{RESERVED_ROOT}/locks/{}", namespace.join(key)).into())
    }

    /// Consumes the key into its string.
    pub fn into_string(self) -> String {
        self.0.to_string()
    }
}

impl Prefix {
    /// Validates a prefix; the empty string is the whole namespace.
    pub fn new(prefix: impl Into<String>) -> Result<Self> {
        let prefix = prefix.into();
        if !prefix.is_empty() {
            check_user(&prefix)?;
        }
        Ok(Prefix(prefix))
    }

    /// The empty prefix.
    pub fn root() -> Self {
        Prefix::default()
    }

    /// The prefix as a string (no trailing `/`).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for the empty prefix.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The string every key strictly below this prefix starts with:
    /// `""` for the root, otherwise `"prefix/"`.
    pub fn dir(&self) -> String {
        if self.0.is_empty() {
            String::new()
        } else {
            format!("{}/", self.0)
        }
    }

    /// True when `key` is strictly below this prefix.
    pub fn contains(&self, key: &str) -> bool {
        self.0.is_empty()
            || (key.len() > self.0.len() + 1
                && key.as_bytes()[self.0.len()] == b'/'
                && key.starts_with(&self.0))
    }

    /// True when every key below `other` is also below this prefix
    /// (a prefix covers itself; the root covers everything).
    pub fn covers(&self, other: &Prefix) -> bool {
        self.0.is_empty() || self.0 == other.0 || self.contains(&other.0)
    }

    /// `prefix/key` (or `key` for the root).
    pub fn join(&self, key: &Key) -> Key {
        if self.0.is_empty() {
            key.clone()
        } else {
            Key(format!("{}/{}", self.0, key.0).into())
        }
    }

    /// `prefix/inner` as a prefix.
    pub fn join_prefix(&self, inner: &Prefix) -> Prefix {
        match (self.0.is_empty(), inner.0.is_empty()) {
            (true, _) => inner.clone(),
            (false, true) => self.clone(),
            (false, false) => Prefix(format!("{}/{}", self.0, inner.0)),
        }
    }

    /// The part of `key` below this prefix, if `key` is strictly below it.
    pub fn strip(&self, key: &Key) -> Option<Key> {
        if self.0.is_empty() {
            return Some(key.clone());
        }
        self.contains(&key.0)
            .then(|| Key(key.0[self.0.len() + 1..].into()))
    }

    /// The name one level below this prefix on the way to `key`
    /// (`a` and `a/b/c` → `b`), if `key` is below it.
    pub fn child_name<'k>(&self, key: &'k str) -> Option<&'k str> {
        if !self.contains(key) {
            return None;
        }
        let rest = if self.0.is_empty() {
            key
        } else {
            &key[self.0.len() + 1..]
        };
        rest.split('/').next()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Key {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl FromStr for Key {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Key::new(s)
    }
}

impl TryFrom<&str> for Key {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        Key::new(s)
    }
}

impl TryFrom<String> for Key {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Key::new(s)
    }
}

impl FromStr for Prefix {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Prefix::new(s)
    }
}

impl TryFrom<&str> for Prefix {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        Prefix::new(s)
    }
}

impl From<Key> for Prefix {
    fn from(k: Key) -> Self {
        Prefix(k.0.to_string())
    }
}

impl serde::Serialize for Key {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Key::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_keys() {
        for k in [
            "a",
            "a/b",
            "a.b/c-d_e",
            "ünï/çødé",
            "x".repeat(1024).as_str(),
        ] {
            assert!(Key::new(k).is_ok(), "{k}");
        }
    }

    #[test]
    fn invalid_keys() {
        let long = "x".repeat(1025);
        for k in [
            "",
            "/a",
            "a/",
            "a//b",
            ".",
            "..",
            "a/./b",
            "a/../b",
            "a\nb",
            "a\0b",
            "\u{7f}",
            "__anykv",
            "__anykv/x",
            long.as_str(),
        ] {
            let e = Key::new(k).expect_err(k);
            assert!(matches!(e, Error::InvalidKey { .. }), "{k}: {e}");
        }
    }

    #[test]
    fn prefix_is_directory_scoped() {
        let p = Prefix::new("a").unwrap();
        assert!(p.contains("a/b"));
        assert!(!p.contains("ab"));
        assert!(!p.contains("a"));
        assert!(!p.contains("a/"));
        assert!(Prefix::root().contains("anything"));
        assert_eq!(p.child_name("a/b/c"), Some("b"));
        assert_eq!(Prefix::root().child_name("x/y"), Some("x"));
        assert_eq!(p.child_name("ab/c"), None);
    }

    #[test]
    fn join_and_strip_round_trip() {
        let ns = Prefix::new("ns/t1").unwrap();
        let k = Key::new("a/b").unwrap();
        let inner = ns.join(&k);
        assert_eq!(inner.as_str(), "ns/t1/a/b");
        assert_eq!(ns.strip(&inner), Some(k.clone()));
        assert_eq!(Prefix::root().join(&k), k);
        assert_eq!(ns.strip(&Key::new("ns/t10/a").unwrap()), None);
    }

    #[test]
    fn backend_keys_accept_reserved_root() {
        assert!(Key::from_backend("__anykv/locks/a").is_some());
        assert!(Key::from_backend("a//b").is_none());
        assert_eq!(Key::new("a/b/c").unwrap().parent().as_str(), "a/b");
    }
}
