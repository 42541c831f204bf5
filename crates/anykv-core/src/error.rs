//! The one error type of anykv, and its classification.
//!
//! Every driver maps its client's failures onto [`Error`]; callers match on
//! [`Error::kind`] and use [`Error::is_retryable`] / [`Error::indicates_unreachable`]
//! without knowing which backend is behind the store.

use std::time::Duration;

use crate::types::Version;

/// A boxed error kept as the `source` of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Marks a failure that provably happened before the request reached the
/// server (connection refused, no connection to send on): the write did not
/// happen, so trying it again cannot apply it twice.
///
/// Drivers wrap such a failure's cause in `NotSent` (see
/// [`Error::not_sent`]); [`Error::never_reached_server`] finds it, or an
/// `io::ErrorKind::ConnectionRefused`, anywhere in the source chain.
#[derive(Debug, thiserror::Error)]
#[error("request not sent: {0}")]
pub struct NotSent(#[source] pub BoxError);

/// Result alias used across anykv.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in anykv.
///
/// Variants carry the backend name (`"etcd"`, `"memory"`, …) and the key
/// where one is involved. Secrets never appear in any variant.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key does not exist (or a condition required it to exist).
    #[error("{backend}: not found: {key}")]
    NotFound {
        /// Backend name.
        backend: &'static str,
        /// The key, without the store's namespace.
        key: String,
    },
    /// The key exists but the operation required it to be absent.
    #[error("{backend}: already exists: {key}")]
    AlreadyExists {
        /// Backend name.
        backend: &'static str,
        /// The key.
        key: String,
    },
    /// A version precondition failed.
    #[error(
        "{backend}: conflict on {key}: expected version {}, found {}",
        fmt_version(expected),
        fmt_version(actual)
    )]
    Conflict {
        /// Backend name.
        backend: &'static str,
        /// The key whose precondition failed.
        key: String,
        /// The version the caller expected, if the condition was a version.
        expected: Option<Version>,
        /// The version found, when the backend reports it (`None`: absent or unknown).
        actual: Option<Version>,
    },
    /// The key or prefix breaks the key rules; no backend was contacted.
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The offending key (truncated if very long).
        key: String,
        /// Which rule it broke.
        reason: String,
    },
    /// An argument other than a key is invalid.
    #[error("{backend}: invalid argument: {message}")]
    InvalidArgument {
        /// Backend name.
        backend: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The value is larger than the backend accepts; no backend was contacted.
    #[error("{backend}: value for {key} is {size} bytes, over the limit of {max}")]
    ValueTooLarge {
        /// Backend name.
        backend: &'static str,
        /// The key.
        key: String,
        /// Size of the value given.
        size: usize,
        /// The backend's `max_value_size`.
        max: usize,
    },
    /// The backend does not support this operation (see its [`Capabilities`](crate::Capabilities)).
    #[error("{backend}: unsupported operation: {operation}")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// The operation or option that is not supported.
        operation: &'static str,
    },
    /// The backend cannot be reached or refused service for now.
    #[error("{backend}: unavailable: {message}")]
    Unavailable {
        /// Backend name.
        backend: &'static str,
        /// What happened.
        message: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },
    /// The operation did not finish in time.
    #[error("{backend}: {operation} timed out after {}", humantime::format_duration(*after))]
    Timeout {
        /// Backend name.
        backend: &'static str,
        /// The operation.
        operation: &'static str,
        /// The deadline that passed.
        after: Duration,
    },
    /// A watch asked for history the backend no longer has.
    #[error("{backend}: revision {revision} is compacted (oldest available: {oldest})")]
    Compacted {
        /// Backend name.
        backend: &'static str,
        /// The revision asked for.
        revision: u64,
        /// The oldest revision still available, 0 when unknown.
        oldest: u64,
    },
    /// A lock's lease or session was lost while it was held.
    #[error("{backend}: lock lost: {key}")]
    LockLost {
        /// Backend name.
        backend: &'static str,
        /// The lock key.
        key: String,
    },
    /// Authenticated, but not allowed.
    #[error("{backend}: permission denied: {message}")]
    PermissionDenied {
        /// Backend name.
        backend: &'static str,
        /// What was refused.
        message: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },
    /// Credentials missing or rejected.
    #[error("{backend}: unauthenticated: {message}")]
    Unauthenticated {
        /// Backend name.
        backend: &'static str,
        /// What was refused.
        message: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },
    /// The backend reports lost or corrupt data.
    #[error("{backend}: data loss: {message}")]
    DataLoss {
        /// Backend name.
        backend: &'static str,
        /// What happened.
        message: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },
    /// The operation was cancelled (by the caller or the backend).
    #[error("{backend}: cancelled: {message}")]
    Cancelled {
        /// Backend name.
        backend: &'static str,
        /// What was cancelled.
        message: String,
    },
    /// No linked driver serves this URL scheme.
    #[error("unknown backend {name:?}; available: {}", available.join(", "))]
    UnknownBackend {
        /// The scheme asked for.
        name: String,
        /// Schemes of the linked drivers.
        available: Vec<String>,
    },
    /// The URL is malformed or names an unknown option.
    #[error("invalid url {url}: {reason}")]
    InvalidUrl {
        /// The URL with credentials redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A value could not be encoded or decoded (typed helpers).
    #[error("codec error for {key}: {source}")]
    Codec {
        /// The key.
        key: String,
        /// The codec's error.
        #[source]
        source: BoxError,
    },
    /// Any other backend failure.
    #[error("{backend}: {message}")]
    Backend {
        /// Backend name.
        backend: &'static str,
        /// What happened.
        message: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },
}

fn fmt_version(v: &Option<Version>) -> String {
    match v {
        Some(v) => v.to_string(),
        None => "none".to_owned(),
    }
}

/// A `Copy` summary of an [`Error`]'s variant, for matching and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[allow(missing_docs)] // one-to-one with the variants of `Error`
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    Conflict,
    InvalidKey,
    InvalidArgument,
    ValueTooLarge,
    Unsupported,
    Unavailable,
    Timeout,
    Compacted,
    LockLost,
    PermissionDenied,
    Unauthenticated,
    DataLoss,
    Cancelled,
    UnknownBackend,
    InvalidUrl,
    Codec,
    Backend,
}

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            Error::Conflict { .. } => ErrorKind::Conflict,
            Error::InvalidKey { .. } => ErrorKind::InvalidKey,
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Error::ValueTooLarge { .. } => ErrorKind::ValueTooLarge,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::Unavailable { .. } => ErrorKind::Unavailable,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Compacted { .. } => ErrorKind::Compacted,
            Error::LockLost { .. } => ErrorKind::LockLost,
            Error::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            Error::Unauthenticated { .. } => ErrorKind::Unauthenticated,
            Error::DataLoss { .. } => ErrorKind::DataLoss,
            Error::Cancelled { .. } => ErrorKind::Cancelled,
            Error::UnknownBackend { .. } => ErrorKind::UnknownBackend,
            Error::InvalidUrl { .. } => ErrorKind::InvalidUrl,
            Error::Codec { .. } => ErrorKind::Codec,
            Error::Backend { .. } => ErrorKind::Backend,
        }
    }

    /// True when trying the same idempotent operation again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind(), ErrorKind::Unavailable | ErrorKind::Timeout)
    }

    /// True when the error says the backend cannot be reached: the liveness
    /// monitor turns not-alive on these and only these.
    pub fn indicates_unreachable(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::Unavailable | ErrorKind::Timeout | ErrorKind::DataLoss
        )
    }

    /// The key this error is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            Error::NotFound { key, .. }
            | Error::AlreadyExists { key, .. }
            | Error::Conflict { key, .. }
            | Error::InvalidKey { key, .. }
            | Error::ValueTooLarge { key, .. }
            | Error::LockLost { key, .. }
            | Error::Codec { key, .. } => Some(key),
            _ => None,
        }
    }

    /// Shorthand for [`Error::Unavailable`] with a source.
    pub fn unavailable(
        backend: &'static str,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Unavailable {
            backend,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// [`Error::Unavailable`] for a request that provably never reached the
    /// server: the retry layer may retry even a non-idempotent write on it.
    pub fn not_sent(
        backend: &'static str,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::unavailable(backend, message, NotSent(source.into()))
    }

    /// True when the request provably never reached the server: the source
    /// chain holds a [`NotSent`] marker or a refused TCP connection. Only
    /// then is a write retried (etcd's own client does the same), since a
    /// write that timed out may have been applied.
    pub fn never_reached_server(&self) -> bool {
        if self.kind() != ErrorKind::Unavailable {
            return false;
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(self);
        while let Some(c) = cause {
            if c.is::<NotSent>() {
                return true;
            }
            if let Some(io) = c.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::ConnectionRefused
            {
                return true;
            }
            cause = c.source();
        }
        false
    }

    /// An error of `kind` that carries only a message, for a driver that
    /// reports one failure to several callers (errors are not `Clone`): the
    /// kinds callers branch on keep their variant (`Unavailable`,
    /// `PermissionDenied`, `Unauthenticated`); any other is
    /// [`Error::Backend`].
    ///
    /// ```
    /// use anykv_core::{Error, ErrorKind};
    /// let e = Error::of_kind(ErrorKind::PermissionDenied, "consul", "watch: 403");
    /// assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    /// assert_eq!(Error::of_kind(ErrorKind::Codec, "consul", "x").kind(), ErrorKind::Backend);
    /// ```
    pub fn of_kind(kind: ErrorKind, backend: &'static str, message: impl Into<String>) -> Self {
        let message = message.into();
        match kind {
            ErrorKind::Unavailable => Error::Unavailable {
                backend,
                message,
                source: None,
            },
            ErrorKind::PermissionDenied => Error::PermissionDenied {
                backend,
                message,
                source: None,
            },
            ErrorKind::Unauthenticated => Error::Unauthenticated {
                backend,
                message,
                source: None,
            },
            _ => Error::Backend {
                backend,
                message,
                source: None,
            },
        }
    }

    /// Shorthand for [`Error::Backend`] with a source.
    pub fn backend(
        backend: &'static str,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Backend {
            backend,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// Rewrites the key carried by this error (used by the namespace layer to
    /// report keys as the caller wrote them).
    pub(crate) fn map_key(mut self, f: impl FnOnce(&str) -> String) -> Self {
        match &mut self {
            Error::NotFound { key, .. }
            | Error::AlreadyExists { key, .. }
            | Error::Conflict { key, .. }
            | Error::ValueTooLarge { key, .. }
            | Error::LockLost { key, .. }
            | Error::Codec { key, .. } => *key = f(key),
            _ => {}
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_table() {
        let b = "test";
        let cases: Vec<(Error, bool, bool)> = vec![
            (Error::unavailable(b, "down", "refused"), true, true),
            (
                Error::Timeout {
                    backend: b,
                    operation: "get",
                    after: Duration::from_secs(1),
                },
                true,
                true,
            ),
            (
                Error::DataLoss {
                    backend: b,
                    message: "x".into(),
                    source: None,
                },
                true,
                false,
            ),
            (
                Error::NotFound {
                    backend: b,
                    key: "k".into(),
                },
                false,
                false,
            ),
            (
                Error::Conflict {
                    backend: b,
                    key: "k".into(),
                    expected: None,
                    actual: None,
                },
                false,
                false,
            ),
            (
                Error::InvalidKey {
                    key: "/".into(),
                    reason: "r".into(),
                },
                false,
                false,
            ),
            (
                Error::PermissionDenied {
                    backend: b,
                    message: "no".into(),
                    source: None,
                },
                false,
                false,
            ),
            (
                Error::Cancelled {
                    backend: b,
                    message: "c".into(),
                },
                false,
                false,
            ),
        ];
        for (e, unreachable, retryable) in cases {
            assert_eq!(e.indicates_unreachable(), unreachable, "{e}");
            assert_eq!(e.is_retryable(), retryable, "{e}");
        }
    }

    #[test]
    fn only_a_marked_or_refused_failure_never_reached_the_server() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let wrapped = Error::unavailable("t", "connect", Error::backend("t", "x", refused));
        assert!(wrapped.never_reached_server(), "refused deep in the chain");
        assert!(Error::not_sent("t", "no connection", "closed").never_reached_server());
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(!Error::unavailable("t", "io", reset).never_reached_server());
        let timeout = Error::Timeout {
            backend: "t",
            operation: "put",
            after: Duration::from_secs(1),
        };
        assert!(
            !timeout.never_reached_server(),
            "a timed-out write may have applied"
        );
    }

    #[test]
    fn conflict_display_names_versions() {
        let e = Error::Conflict {
            backend: "memory",
            key: "a".into(),
            expected: Some(Version::new(3)),
            actual: None,
        };
        assert_eq!(
            e.to_string(),
            "memory: conflict on a: expected version 3, found none"
        );
    }
}
