//! Keys and key ranges on etcd's flat byte keyspace, and etcd pairs → anykv pairs.

use anykv_core::{Bytes, Key, KvPair, Prefix, Target, Version};
use etcd_client::proto::PbKeyValue;

/// A `[start, end)` range of etcd keys. `end == [0]` means "to the end of the
/// keyspace" (etcd's convention), with `start == [0]` the whole keyspace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Range {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
}

impl Range {
    /// Every key strictly below `prefix` (directory semantics): the range of
    /// `prefix/`, so `a` never covers `ab`. The root prefix is the whole keyspace.
    pub fn below(prefix: &Prefix) -> Range {
        if prefix.is_root() {
            return Range {
                start: vec![0],
                end: vec![0],
            };
        }
        let start = prefix.dir().into_bytes();
        let end = range_end(&start);
        Range { start, end }
    }

    /// Every key strictly below `key/` (records kept under a lock key).
    pub fn children(key: &Key) -> Range {
        Range::below(&key.as_prefix())
    }

    /// The range a watch target covers: one key (empty end) or a directory.
    pub fn of_target(target: &Target) -> Range {
        match target {
            Target::Key(k) => Range {
                start: k.as_str().as_bytes().to_vec(),
                end: Vec::new(),
            },
            Target::Prefix(p) => Range::below(p),
        }
    }
}

/// The smallest key greater than every key starting with `prefix`
/// (etcd's `GetPrefixRangeEnd`): the prefix with its last byte below 0xff
/// incremented and the rest cut off; `[0]` (no end) if there is none.
pub(crate) fn range_end(prefix: &[u8]) -> Vec<u8> {
    for (i, b) in prefix.iter().enumerate().rev() {
        if *b < 0xff {
            let mut end = prefix[..=i].to_vec();
            end[i] = b + 1;
            return end;
        }
    }
    vec![0]
}

/// A store-wide etcd revision as anykv's unsigned one (etcd's are positive).
pub(crate) fn rev(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

/// An anykv version as an etcd revision to compare with; a version no etcd
/// revision can equal becomes -1, which no key ever has.
pub(crate) fn version_rev(v: Version) -> i64 {
    i64::try_from(v.get()).unwrap_or(-1)
}

/// Turns an etcd pair into an anykv pair, taking the value without a copy.
/// `key` is the pair's key when the caller already knows it; otherwise the
/// etcd key is checked and pairs no anykv client could have written (a
/// foreign tool's `/a` or `a//b`, non-UTF-8 bytes) are skipped.
pub(crate) fn pair(pb: PbKeyValue, key: Option<&Key>) -> Option<KvPair> {
    let key = match key {
        Some(k) => k.clone(),
        None => Key::from_backend(std::str::from_utf8(&pb.key).ok()?)?,
    };
    Some(KvPair {
        key,
        value: Bytes::from(pb.value),
        // mod_revision: store-wide, changes on every write, never reused even
        // after delete + re-create (etcd's per-key `version` restarts at 1).
        version: Version::new(rev(pb.mod_revision)),
        create_revision: rev(pb.create_revision),
        mod_revision: rev(pb.mod_revision),
    })
}

/// The anykv key of an etcd key, if it is one.
pub(crate) fn key_of(raw: &[u8]) -> Option<Key> {
    Key::from_backend(std::str::from_utf8(raw).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_end_increments_last_byte() {
        assert_eq!(range_end(b"a/"), b"a0");
        assert_eq!(range_end(b"a\xff"), b"b");
        assert_eq!(range_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn directory_ranges_exclude_siblings_with_the_same_start() {
        let r = Range::below(&Prefix::new("a").unwrap());
        assert_eq!(r.start, b"a/");
        assert_eq!(r.end, b"a0");
        // "ab" sorts after "a0"? No: 'b' > '0', so "ab" >= end: excluded.
        assert!(b"ab".as_slice() >= r.end.as_slice());
        assert!(b"a/z".as_slice() < r.end.as_slice());
        let all = Range::below(&Prefix::root());
        assert_eq!((all.start, all.end), (vec![0], vec![0]));
    }

    #[test]
    fn foreign_keys_are_skipped() {
        assert!(key_of(b"/abs").is_none());
        assert!(key_of(b"a//b").is_none());
        assert!(key_of(&[0xff, 0xfe]).is_none());
        assert_eq!(key_of(b"a/b").unwrap().as_str(), "a/b");
    }

    #[test]
    fn versions_outside_etcd_range_never_match() {
        assert_eq!(version_rev(Version::new(u64::MAX)), -1);
        assert_eq!(version_rev(Version::new(7)), 7);
    }
}
