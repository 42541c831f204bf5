//! etcd-client errors → [`anykv_core::Error`] (DESIGN §8), as one table.
//!
//! The gRPC code decides, after the voltha `db.Backend` classification:
//! `Unavailable`, `DeadlineExceeded` and `DataLoss` mean "cannot reach a
//! working cluster" (the liveness monitor turns not-alive); `InvalidArgument`,
//! `NotFound`, `PermissionDenied`, `FailedPrecondition`, `Cancelled` and the
//! rest prove that a server answered, so the backend stays alive.
//!
//! Two refinements on top of the codes:
//! - a status that tonic made *locally* from a transport failure (it carries a
//!   `source`; statuses sent by a server never do) is `Unavailable` whatever
//!   code tonic picked: a reset connection surfaces as `Unknown`, `Internal` or
//!   even `Cancelled` (hyper's "connection closed"), and none of those mean the
//!   server said anything;
//! - a few etcd messages have a more precise anykv kind than their code:
//!   compaction (`OutOfRange`) is [`Error::Compacted`], bad credentials
//!   (`InvalidArgument` in etcd 3.4) are [`Error::Unauthenticated`],
//!   "too many requests" (`ResourceExhausted`) is a retryable `Unavailable`,
//!   and "requested lease not found" (`NotFound`, a put attached to a lease
//!   that is gone) is [`Error::LockLost`]: the session or lock it belonged to
//!   ended.

use std::time::Duration;

use anykv_core::Error;
use etcd_client::Error as EtcdError;
use tonic::{Code, Status};

/// The backend name used in every error of this driver.
pub(crate) const BACKEND: &str = "etcd";

/// What the failed call was about, to fill the anykv error's fields.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ctx<'a> {
    /// Operation name (`"get"`, `"watch"`, …).
    pub op: &'static str,
    /// The key, if the operation is about one.
    pub key: Option<&'a str>,
    /// The driver's timeout, reported by `Timeout` errors.
    pub timeout: Duration,
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(op: &'static str, key: Option<&'a str>, timeout: Duration) -> Self {
        Ctx { op, key, timeout }
    }

    /// The `Timeout` error for this call.
    pub(crate) fn timeout_error(&self) -> Error {
        Error::Timeout {
            backend: BACKEND,
            operation: self.op,
            after: self.timeout,
        }
    }
}

/// Maps an etcd-client error.
pub(crate) fn map(e: EtcdError, ctx: Ctx<'_>) -> Error {
    match e {
        EtcdError::GRpcStatus(status) => map_status(status, ctx),
        // The channel could not be set up or broke: nothing reached a server.
        EtcdError::TransportError(_) | EtcdError::IoError(_) => {
            Error::unavailable(BACKEND, format!("{}: connection failed", ctx.op), e)
        }
        // etcd-client reports a closed watch/keep-alive request channel this
        // way: the stream under it is gone.
        EtcdError::WatchError(_) => {
            Error::unavailable(BACKEND, format!("{}: stream closed", ctx.op), e)
        }
        EtcdError::InvalidArgs(_)
        | EtcdError::InvalidUri(_)
        | EtcdError::InvalidMetadataValue(_)
        | EtcdError::Utf8Error(_) => Error::InvalidArgument {
            backend: BACKEND,
            message: format!("{}: {e}", ctx.op),
        },
        other => Error::backend(BACKEND, format!("{}: {other}", ctx.op), other),
    }
}

/// True when tonic made `status` from a refused TCP connection (the cause
/// is in the status's source chain, which etcd-client's error hides).
fn refused(status: &Status) -> bool {
    let mut cause = std::error::Error::source(status);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Maps a gRPC status: the classification table.
pub(crate) fn map_status(status: Status, ctx: Ctx<'_>) -> Error {
    let msg = status.message().to_owned();
    let key = || ctx.key.unwrap_or_default().to_owned();
    let described = format!("{}: {msg}", ctx.op);
    // A status tonic built from a local failure carries its cause; one decoded
    // from a server's trailers never does.
    let local = std::error::Error::source(&status).is_some();
    if refused(&status) {
        // Nothing was sent: the retry layer may retry even a write.
        return Error::not_sent(BACKEND, described, EtcdError::GRpcStatus(status));
    }
    match status.code() {
        Code::Unknown | Code::Internal | Code::Cancelled if local => {
            Error::unavailable(BACKEND, described, EtcdError::GRpcStatus(status))
        }
        Code::Unavailable => Error::unavailable(BACKEND, described, EtcdError::GRpcStatus(status)),
        Code::DeadlineExceeded => ctx.timeout_error(),
        Code::DataLoss => Error::DataLoss {
            backend: BACKEND,
            message: described,
            source: Some(Box::new(EtcdError::GRpcStatus(status))),
        },
        Code::ResourceExhausted if msg.contains("too many requests") => {
            Error::unavailable(BACKEND, described, EtcdError::GRpcStatus(status))
        }
        Code::OutOfRange if msg.contains("compacted") => Error::Compacted {
            backend: BACKEND,
            revision: 0,
            oldest: 0,
        },
        Code::InvalidArgument
            if msg.contains("authentication failed") || msg.contains("user name is empty") =>
        {
            Error::Unauthenticated {
                backend: BACKEND,
                message: described,
                source: Some(Box::new(EtcdError::GRpcStatus(status))),
            }
        }
        Code::InvalidArgument | Code::OutOfRange => Error::InvalidArgument {
            backend: BACKEND,
            message: described,
        },
        // A put attached to a lease that was revoked or expired (a session's
        // or lock's): what it belonged to is gone, which is not the key's
        // absence.
        Code::NotFound if msg.contains("lease not found") => Error::LockLost {
            backend: BACKEND,
            key: key(),
        },
        Code::NotFound => Error::NotFound {
            backend: BACKEND,
            key: key(),
        },
        Code::AlreadyExists => Error::AlreadyExists {
            backend: BACKEND,
            key: key(),
        },
        Code::PermissionDenied => Error::PermissionDenied {
            backend: BACKEND,
            message: described,
            source: Some(Box::new(EtcdError::GRpcStatus(status))),
        },
        Code::Unauthenticated => Error::Unauthenticated {
            backend: BACKEND,
            message: described,
            source: Some(Box::new(EtcdError::GRpcStatus(status))),
        },
        Code::Cancelled => Error::Cancelled {
            backend: BACKEND,
            message: described,
        },
        Code::Unimplemented => Error::Unsupported {
            backend: BACKEND,
            operation: ctx.op,
        },
        // FailedPrecondition, Aborted, ResourceExhausted (e.g. the space
        // quota), Unknown and Internal from a server, Ok: the server answered.
        _ => Error::backend(BACKEND, described, EtcdError::GRpcStatus(status)),
    }
}

/// True when the request was certainly never sent: tonic could not open a
/// connection to the endpoint the balancer picked (`ConnectError` in the
/// status's cause). Such a request may be sent again, even a non-idempotent
/// one, and the balancer gets a chance to pick a live member.
pub(crate) fn never_sent(e: &EtcdError) -> bool {
    let EtcdError::GRpcStatus(status) = e else {
        return false;
    };
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if err.downcast_ref::<tonic::ConnectError>().is_some() {
            return true;
        }
        source = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use anykv_core::ErrorKind;

    use super::*;

    fn ctx() -> Ctx<'static> {
        Ctx::new("get", Some("a/b"), Duration::from_secs(2))
    }

    /// The voltha classification, code by code, with etcd's own messages.
    #[test]
    fn classification_table() {
        let cases: &[(Code, &str, ErrorKind, bool)] = &[
            // unreachable
            (
                Code::DeadlineExceeded,
                "context deadline exceeded",
                ErrorKind::Timeout,
                true,
            ),
            (
                Code::Unavailable,
                "etcdserver: no leader",
                ErrorKind::Unavailable,
                true,
            ),
            (
                Code::Unavailable,
                "etcdserver: request timed out",
                ErrorKind::Unavailable,
                true,
            ),
            (
                Code::Unavailable,
                "etcdserver: leader changed",
                ErrorKind::Unavailable,
                true,
            ),
            (Code::DataLoss, "corrupt", ErrorKind::DataLoss, true),
            (
                Code::ResourceExhausted,
                "etcdserver: too many requests",
                ErrorKind::Unavailable,
                true,
            ),
            // alive
            (
                Code::InvalidArgument,
                "etcdserver: duplicate key given in txn request",
                ErrorKind::InvalidArgument,
                false,
            ),
            (
                Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password",
                ErrorKind::Unauthenticated,
                false,
            ),
            (
                Code::NotFound,
                "etcdserver: requested lease not found",
                ErrorKind::LockLost,
                false,
            ),
            (
                Code::PermissionDenied,
                "etcdserver: permission denied",
                ErrorKind::PermissionDenied,
                false,
            ),
            (
                Code::Unauthenticated,
                "etcdserver: invalid auth token",
                ErrorKind::Unauthenticated,
                false,
            ),
            (
                Code::FailedPrecondition,
                "etcdserver: authentication is not enabled",
                ErrorKind::Backend,
                false,
            ),
            (
                Code::Cancelled,
                "etcdserver: request cancelled",
                ErrorKind::Cancelled,
                false,
            ),
            (
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted",
                ErrorKind::Compacted,
                false,
            ),
            (
                Code::OutOfRange,
                "etcdserver: mvcc: required revision is a future revision",
                ErrorKind::InvalidArgument,
                false,
            ),
            (
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded",
                ErrorKind::Backend,
                false,
            ),
            (
                Code::Unimplemented,
                "unknown service",
                ErrorKind::Unsupported,
                false,
            ),
            (
                Code::AlreadyExists,
                "exists",
                ErrorKind::AlreadyExists,
                false,
            ),
            (
                Code::Unknown,
                "server said something odd",
                ErrorKind::Backend,
                false,
            ),
            (Code::Internal, "server bug", ErrorKind::Backend, false),
        ];
        for (code, msg, kind, unreachable) in cases {
            let e = map(EtcdError::GRpcStatus(Status::new(*code, *msg)), ctx());
            assert_eq!(e.kind(), *kind, "{code:?} {msg}: {e}");
            assert_eq!(
                e.indicates_unreachable(),
                *unreachable,
                "{code:?} {msg}: {e}"
            );
        }
    }

    #[test]
    fn local_transport_failures_are_unreachable_whatever_the_code() {
        for kind in [
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::BrokenPipe,
            std::io::ErrorKind::Other,
        ] {
            let status = Status::from_error(Box::new(std::io::Error::new(kind, "boom")));
            assert!(std::error::Error::source(&status).is_some());
            let e = map(EtcdError::GRpcStatus(status), ctx());
            assert!(e.indicates_unreachable(), "{kind:?}: {e}");
        }
        let e = map(
            EtcdError::IoError(std::io::Error::other("connect refused")),
            ctx(),
        );
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        let e = map(EtcdError::WatchError("channel closed".into()), ctx());
        assert_eq!(e.kind(), ErrorKind::Unavailable);
    }

    #[test]
    fn only_a_refused_connection_never_reached_the_server() {
        let status = |kind| Status::from_error(Box::new(std::io::Error::new(kind, "x")));
        let refused = map(
            EtcdError::GRpcStatus(status(std::io::ErrorKind::ConnectionRefused)),
            ctx(),
        );
        assert!(refused.never_reached_server(), "{refused}");
        assert_eq!(refused.kind(), ErrorKind::Unavailable);
        let reset = map(
            EtcdError::GRpcStatus(status(std::io::ErrorKind::ConnectionReset)),
            ctx(),
        );
        assert!(
            !reset.never_reached_server(),
            "a reset request may have applied"
        );
        let server = map(
            EtcdError::GRpcStatus(Status::unavailable("no leader")),
            ctx(),
        );
        assert!(!server.never_reached_server());
    }

    #[test]
    fn not_found_and_timeout_carry_context() {
        let e = map(EtcdError::GRpcStatus(Status::not_found("x")), ctx());
        assert_eq!(e.key(), Some("a/b"));
        match map(EtcdError::GRpcStatus(Status::deadline_exceeded("x")), ctx()) {
            Error::Timeout {
                operation, after, ..
            } => {
                assert_eq!(operation, "get");
                assert_eq!(after, Duration::from_secs(2));
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn client_side_argument_errors_keep_alive() {
        let e = map(EtcdError::InvalidArgs("empty endpoints".into()), ctx());
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(!e.indicates_unreachable());
    }

    #[test]
    fn refused_connection_is_never_sent() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let connect = Status::from_error(Box::new(tonic::ConnectError(Box::new(refused))));
        assert_eq!(connect.code(), Code::Unavailable);
        let connect = EtcdError::GRpcStatus(connect);
        assert!(never_sent(&connect));
        assert!(map(connect, ctx()).indicates_unreachable());
        // A server's Unavailable may have been applied: not "never sent".
        assert!(!never_sent(&EtcdError::GRpcStatus(Status::unavailable(
            "etcdserver: request timed out"
        ))));
    }
}
