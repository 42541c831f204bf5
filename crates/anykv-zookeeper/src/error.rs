//! ZooKeeper client errors mapped onto [`anykv_core::Error`] (DESIGN §8).
//!
//! | zookeeper-client | anykv | unreachable? |
//! |---|---|---|
//! | `ConnectionLoss`, `SessionExpired`, `SessionMoved`, `NoHosts`, `Timeout`, `ClientClosed`, `NotReadOnly`, `Throttled` | `Unavailable` | yes |
//! | `Custom` (the client's own connection failures: I/O errors, "no response from connection in …") | `Unavailable` | yes |
//! | `NoNode` | `NotFound` | no |
//! | `NodeExists` | `AlreadyExists` | no |
//! | `BadVersion`, `RuntimeInconsistent` | `Conflict` | no |
//! | `NoAuth` | `PermissionDenied` | no |
//! | `AuthFailed` | `Unauthenticated` | no |
//! | `BadArguments`, `InvalidAcl`, `NoChildrenForEphemerals` | `InvalidArgument` | no |
//! | `Unimplemented` | `Unsupported` | no |
//! | anything else (`NotEmpty`, `QuotaExceeded`, marshalling, …) | `Backend` | no |
//!
//! None of these says the request was never sent: zookeeper-client fails a
//! request it had sent with the error that ended its connection, and a
//! request queued while disconnected with the session's end. Only the
//! driver's own refusals are marked *never sent*
//! ([`Error::never_reached_server`]): a session that cannot be opened, or
//! one that is disconnected when the operation starts (`conn::session`).

use anykv_core::Error;
use zookeeper_client as zk;

/// Backend name in every error and registration.
pub(crate) const BACKEND: &str = "zookeeper";

/// Maps a client error for `operation` on `key` (a key without leading `/`,
/// or a description for operations on no single key).
pub(crate) fn map(err: zk::Error, operation: &'static str, key: &str) -> Error {
    use zk::Error as Z;
    let message = format!("{operation} {key}: {err}");
    match err {
        Z::NoNode => Error::NotFound {
            backend: BACKEND,
            key: key.to_owned(),
        },
        Z::NodeExists => Error::AlreadyExists {
            backend: BACKEND,
            key: key.to_owned(),
        },
        Z::BadVersion | Z::RuntimeInconsistent => Error::Conflict {
            backend: BACKEND,
            key: key.to_owned(),
            expected: None,
            actual: None,
        },
        Z::NoAuth => Error::PermissionDenied {
            backend: BACKEND,
            message,
            source: Some(Box::new(err)),
        },
        Z::AuthFailed => Error::Unauthenticated {
            backend: BACKEND,
            message,
            source: Some(Box::new(err)),
        },
        Z::ConnectionLoss
        | Z::SessionExpired
        | Z::SessionMoved
        | Z::NoHosts
        | Z::Timeout
        | Z::ClientClosed
        | Z::NotReadOnly
        | Z::Throttled
        // zookeeper-client fails the requests in flight with the error that
        // ended their connection, a `Custom` one (an I/O error, or "no
        // response from connection in …"); server replies never are.
        | Z::Custom(_) => Error::Unavailable {
            backend: BACKEND,
            message,
            source: Some(Box::new(err)),
        },
        Z::NoChildrenForEphemerals => Error::InvalidArgument {
            backend: BACKEND,
            message: format!(
                "{operation} {key}: below a session key (ZooKeeper ephemeral znodes \
                 have no children)"
            ),
        },
        Z::BadArguments(_) | Z::InvalidAcl => Error::InvalidArgument {
            backend: BACKEND,
            message,
        },
        Z::Unimplemented => Error::Unsupported {
            backend: BACKEND,
            operation,
        },
        other => Error::Backend {
            backend: BACKEND,
            message,
            source: Some(Box::new(other)),
        },
    }
}

/// True for errors after which the session cannot be used any more, so the
/// connection manager must open a new one.
pub(crate) fn session_gone(err: &zk::Error) -> bool {
    matches!(
        err,
        zk::Error::SessionExpired | zk::Error::ClientClosed | zk::Error::AuthFailed
    )
}

#[cfg(test)]
mod tests {
    use anykv_core::ErrorKind;

    use super::*;

    #[test]
    fn mapping_table() {
        use zk::Error as Z;
        let cases: Vec<(Z, ErrorKind, bool)> = vec![
            (Z::ConnectionLoss, ErrorKind::Unavailable, true),
            (Z::SessionExpired, ErrorKind::Unavailable, true),
            (Z::SessionMoved, ErrorKind::Unavailable, true),
            (Z::NoHosts, ErrorKind::Unavailable, true),
            (Z::Timeout, ErrorKind::Unavailable, true),
            (Z::ClientClosed, ErrorKind::Unavailable, true),
            (Z::Throttled, ErrorKind::Unavailable, true),
            (Z::NoNode, ErrorKind::NotFound, false),
            (Z::NodeExists, ErrorKind::AlreadyExists, false),
            (Z::BadVersion, ErrorKind::Conflict, false),
            (Z::RuntimeInconsistent, ErrorKind::Conflict, false),
            (Z::NoAuth, ErrorKind::PermissionDenied, false),
            (Z::AuthFailed, ErrorKind::Unauthenticated, false),
            (Z::InvalidAcl, ErrorKind::InvalidArgument, false),
            (Z::BadArguments(&"bad"), ErrorKind::InvalidArgument, false),
            (Z::Unimplemented, ErrorKind::Unsupported, false),
            (Z::NotEmpty, ErrorKind::Backend, false),
            (Z::QuotaExceeded, ErrorKind::Backend, false),
            (Z::MarshallingError, ErrorKind::Backend, false),
            (Z::UnexpectedErrorCode(-999), ErrorKind::Backend, false),
        ];
        for (zk_err, kind, unreachable) in cases {
            let shown = zk_err.to_string();
            let e = map(zk_err, "get", "a/b");
            assert_eq!(e.kind(), kind, "{shown} → {e}");
            assert_eq!(e.indicates_unreachable(), unreachable, "{shown} → {e}");
        }
        let e = map(Z::NoNode, "get", "a/b");
        assert_eq!(e.key(), Some("a/b"), "key-carrying errors name the key");
    }

    #[test]
    fn only_the_drivers_own_refusals_are_never_sent() {
        use zk::Error as Z;
        for sent in [Z::ConnectionLoss, Z::SessionExpired, Z::Timeout] {
            let shown = sent.to_string();
            let e = map(sent, "put", "a");
            assert!(!e.never_reached_server(), "{shown} may have been applied");
        }
        let refused = crate::conn::not_connected("disconnected");
        assert_eq!(refused.kind(), ErrorKind::Unavailable);
        assert!(refused.never_reached_server());
        assert!(refused.indicates_unreachable());
    }

    #[test]
    fn terminal_session_errors() {
        assert!(session_gone(&zk::Error::SessionExpired));
        assert!(session_gone(&zk::Error::ClientClosed));
        assert!(!session_gone(&zk::Error::ConnectionLoss));
        assert!(!session_gone(&zk::Error::NoNode));
    }
}
