//! The on-disk encoding of records and logged events.
//!
//! Hand-written little-endian layouts rather than a serde format: they are
//! tiny, fixed, and decoding a record on the read path must cost next to
//! nothing. A value that does not decode is reported as [`Corrupt`], which
//! the driver turns into `Error::DataLoss`.

use anykv_core::{Bytes, Event, Key, KvPair, Revision, Version};

/// Bytes before the value in a record: mod revision, create revision, expiry.
const RECORD_HEADER: usize = 24;

/// A stored value failed to decode.
#[derive(Debug)]
pub(crate) struct Corrupt(pub(crate) &'static str);

/// One key's stored state.
///
/// The version of a key is the store revision of its last write, which is
/// never reused, so a separate version field is not needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    /// Revision of the last write (also the key's version).
    pub(crate) mod_rev: Revision,
    /// Revision at which this incarnation of the key was created.
    pub(crate) create_rev: Revision,
    /// Unix time in milliseconds after which the key is gone; 0: never.
    pub(crate) expires_ms: u64,
    /// The value.
    pub(crate) value: Bytes,
}

impl Record {
    /// True when the key's TTL has run out at `now_ms`.
    pub(crate) fn expired(&self, now_ms: u64) -> bool {
        self.expires_ms != 0 && self.expires_ms <= now_ms
    }

    /// The pair as the API shows it.
    pub(crate) fn into_pair(self, key: Key) -> KvPair {
        KvPair {
            key,
            value: self.value,
            version: Version::new(self.mod_rev),
            create_revision: self.create_rev,
            mod_revision: self.mod_rev,
        }
    }
}

/// Encodes a record.
pub(crate) fn encode_record(
    mod_rev: u64,
    create_rev: u64,
    expires_ms: u64,
    value: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_HEADER + value.len());
    out.extend_from_slice(&mod_rev.to_le_bytes());
    out.extend_from_slice(&create_rev.to_le_bytes());
    out.extend_from_slice(&expires_ms.to_le_bytes());
    out.extend_from_slice(value);
    out
}

/// The header of a record without copying its value: `(mod, create, expires)`.
pub(crate) fn record_header(raw: &[u8]) -> Result<(u64, u64, u64), Corrupt> {
    let mut r = Reader(raw);
    Ok((r.u64()?, r.u64()?, r.u64()?))
}

/// Decodes a record, copying its value.
pub(crate) fn decode_record(raw: &[u8]) -> Result<Record, Corrupt> {
    let (mod_rev, create_rev, expires_ms) = record_header(raw)?;
    Ok(Record {
        mod_rev,
        create_rev,
        expires_ms,
        value: Bytes::copy_from_slice(&raw[RECORD_HEADER..]),
    })
}

const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;

/// Encodes the events of one revision (all carry that revision).
pub(crate) fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for ev in events {
        match ev {
            Event::Put { kv, prev } => {
                out.push(TAG_PUT);
                put_bytes(&mut out, kv.key.as_str().as_bytes());
                out.extend_from_slice(&kv.create_revision.to_le_bytes());
                put_bytes(&mut out, &kv.value);
                match prev {
                    None => out.push(0),
                    Some(p) => {
                        out.push(1);
                        out.extend_from_slice(&p.mod_revision.to_le_bytes());
                        out.extend_from_slice(&p.create_revision.to_le_bytes());
                        put_bytes(&mut out, &p.value);
                    }
                }
            }
            Event::Delete { key, .. } => {
                out.push(TAG_DELETE);
                put_bytes(&mut out, key.as_str().as_bytes());
            }
        }
    }
    out
}

/// Decodes the events logged at `revision`. Keys no anykv client could have
/// written are skipped.
pub(crate) fn decode_events(revision: Revision, raw: &[u8]) -> Result<Vec<Event>, Corrupt> {
    let mut r = Reader(raw);
    let n = r.u32()? as usize;
    let mut out = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let tag = r.u8()?;
        let key = r.str()?;
        let key = Key::from_backend(key);
        match tag {
            TAG_PUT => {
                let create_revision = r.u64()?;
                let value = Bytes::copy_from_slice(r.bytes()?);
                let prev = match r.u8()? {
                    0 => None,
                    1 => {
                        let mod_revision = r.u64()?;
                        let create_revision = r.u64()?;
                        let value = Bytes::copy_from_slice(r.bytes()?);
                        key.clone().map(|key| KvPair {
                            key,
                            value,
                            version: Version::new(mod_revision),
                            create_revision,
                            mod_revision,
                        })
                    }
                    _ => return Err(Corrupt("bad prev flag in event log")),
                };
                if let Some(key) = key {
                    out.push(Event::Put {
                        kv: KvPair {
                            key,
                            value,
                            version: Version::new(revision),
                            create_revision,
                            mod_revision: revision,
                        },
                        prev,
                    });
                }
            }
            TAG_DELETE => {
                if let Some(key) = key {
                    out.push(Event::Delete { key, revision });
                }
            }
            _ => return Err(Corrupt("bad event tag in event log")),
        }
    }
    Ok(out)
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Corrupt> {
        if self.0.len() < n {
            return Err(Corrupt("truncated record"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Corrupt> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, Corrupt> {
        let mut b = [0; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, Corrupt> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn bytes(&mut self) -> Result<&'a [u8], Corrupt> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn str(&mut self) -> Result<&'a str, Corrupt> {
        std::str::from_utf8(self.bytes()?).map_err(|_| Corrupt("key is not UTF-8 in event log"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip() {
        let raw = encode_record(7, 3, 99, b"hello");
        let rec = decode_record(&raw).unwrap();
        assert_eq!((rec.mod_rev, rec.create_rev, rec.expires_ms), (7, 3, 99));
        assert_eq!(&rec.value[..], b"hello");
        assert!(rec.expired(99) && !rec.expired(98));
        assert!(decode_record(&raw[..10]).is_err());
    }

    #[test]
    fn events_round_trip() {
        let k = Key::new("a/b").unwrap();
        let prev = KvPair {
            key: k.clone(),
            value: Bytes::from_static(b"old"),
            version: Version::new(4),
            create_revision: 2,
            mod_revision: 4,
        };
        let events = vec![
            Event::Put {
                kv: KvPair {
                    key: k.clone(),
                    value: Bytes::from_static(b"new"),
                    version: Version::new(9),
                    create_revision: 2,
                    mod_revision: 9,
                },
                prev: Some(prev),
            },
            Event::Delete {
                key: Key::new("c").unwrap(),
                revision: 9,
            },
        ];
        let raw = encode_events(&events);
        assert_eq!(decode_events(9, &raw).unwrap(), events);
        assert!(decode_events(9, &raw[..raw.len() - 1]).is_err());
    }
}
