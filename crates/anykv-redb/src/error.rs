//! How redb's errors map onto [`anykv_core::Error`].
//!
//! | redb                                         | anykv            | why                                   |
//! |----------------------------------------------|------------------|---------------------------------------|
//! | `DatabaseAlreadyOpen`, `LockProtocolMismatch`| `Unavailable`    | another process holds the file        |
//! | `Io`, `PreviousIo`, `DatabaseClosed`         | `Unavailable`    | the disk cannot serve us now          |
//! | `Corrupted`, `RepairAborted`                 | `DataLoss`       | the file's contents cannot be trusted |
//! | table type mismatches, `UpgradeRequired`     | `InvalidArgument`| the file is not an anykv file         |
//! | anything else                                | `Backend`        | a bug or an unexpected state          |

use anykv_core::Error;

use crate::codec::Corrupt;

/// Backend name used in every error.
pub(crate) const BACKEND: &str = "redb";

/// Maps a redb error, naming `context` (what was being done) in the message.
///
/// Takes a reference so that one failed commit can fail every request of a
/// group commit with its own error value.
pub(crate) fn map(context: &str, e: &redb::Error) -> Error {
    use redb::Error as R;
    let message = format!("{context}: {e}");
    let source = Some(e.to_string().into());
    match e {
        R::DatabaseAlreadyOpen | R::LockProtocolMismatch => Error::Unavailable {
            backend: BACKEND,
            message: format!(
                "{context}: the file is in use by another process (or another redb handle); \
                 an embedded redb file can be opened by one process at a time"
            ),
            source,
        },
        R::Io(_) | R::PreviousIo | R::DatabaseClosed => Error::Unavailable {
            backend: BACKEND,
            message,
            source,
        },
        R::Corrupted(_) | R::RepairAborted => Error::DataLoss {
            backend: BACKEND,
            message,
            source,
        },
        R::TableTypeMismatch { .. }
        | R::TableIsMultimap(_)
        | R::TableIsNotMultimap(_)
        | R::TypeDefinitionChanged { .. }
        | R::UpgradeRequired(_) => Error::InvalidArgument {
            backend: BACKEND,
            message: format!("{context}: not a file written by anykv-redb ({e})"),
        },
        _ => Error::Backend {
            backend: BACKEND,
            message,
            source,
        },
    }
}

/// Maps any of redb's specific error types.
pub(crate) fn from(context: &str, e: impl Into<redb::Error>) -> Error {
    map(context, &e.into())
}

/// A stored record or event that does not decode.
pub(crate) fn corrupt(c: Corrupt) -> Error {
    Error::DataLoss {
        backend: BACKEND,
        message: format!("undecodable data in the file: {}", c.0),
        source: None,
    }
}

/// The store (or the whole file's engine) was closed.
pub(crate) fn closed() -> Error {
    Error::Unavailable {
        backend: BACKEND,
        message: "the store is closed".into(),
        source: None,
    }
}

/// Converts errors of closures that can fail either way in a blocking task.
pub(crate) enum Failure {
    /// A redb error, mapped on conversion.
    Redb(redb::Error),
    /// An already mapped error.
    Kv(Error),
}

impl<E: Into<redb::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Redb(e.into())
    }
}

impl Failure {
    /// The anykv error, naming `context` for redb errors.
    pub(crate) fn into_error(self, context: &str) -> Error {
        match self {
            Failure::Redb(e) => map(context, &e),
            Failure::Kv(e) => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anykv_core::ErrorKind;

    #[test]
    fn mapping_table() {
        let io = || std::io::Error::other("disk on fire");
        let cases: Vec<(redb::Error, ErrorKind)> = vec![
            (redb::Error::DatabaseAlreadyOpen, ErrorKind::Unavailable),
            (redb::Error::LockProtocolMismatch, ErrorKind::Unavailable),
            (redb::Error::Io(io()), ErrorKind::Unavailable),
            (redb::Error::PreviousIo, ErrorKind::Unavailable),
            (redb::Error::DatabaseClosed, ErrorKind::Unavailable),
            (redb::Error::Corrupted("x".into()), ErrorKind::DataLoss),
            (redb::Error::RepairAborted, ErrorKind::DataLoss),
            (redb::Error::UpgradeRequired(1), ErrorKind::InvalidArgument),
            (
                redb::Error::TableDoesNotExist("kv".into()),
                ErrorKind::Backend,
            ),
            (redb::Error::TransactionInProgress, ErrorKind::Backend),
        ];
        for (e, kind) in cases {
            let shown = e.to_string();
            let mapped = map("open x.redb", &e);
            assert_eq!(mapped.kind(), kind, "{shown}");
            assert!(mapped.to_string().contains("x.redb"), "{mapped}");
        }
        let in_use = map("open x.redb", &redb::Error::DatabaseAlreadyOpen).to_string();
        assert!(in_use.contains("in use"), "{in_use}");
        assert!(corrupt(Corrupt("t")).indicates_unreachable());
    }
}
