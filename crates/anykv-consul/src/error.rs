//! Consul's failures mapped onto [`anykv_core::Error`] (DESIGN §8).
//!
//! | Consul says                                   | anykv error                   | liveness  |
//! |-----------------------------------------------|-------------------------------|-----------|
//! | no connection (refused, connect timeout, TLS  | `Unavailable`, marked         | not alive |
//! | handshake): the request provably never left   | `never_reached_server`        |           |
//! | reset, I/O error after the request was sent   | `Unavailable`                 | not alive |
//! | no answer within the deadline (every request  | `Timeout`                     | not alive |
//! | carries one: the timeout, or a blocking wait) |                               |           |
//! | 5xx, 429 (no leader, rate limited, …)         | `Unavailable`                 | not alive |
//! | 403 `ACL not found` (unknown token)           | `Unauthenticated`             | alive     |
//! | 403 anything else (`Permission denied`)       | `PermissionDenied`            | alive     |
//! | 404 on a read                                 | absent (`Ok(None)`)           | alive     |
//! | 400, 413                                      | `InvalidArgument`             | alive     |
//! | anything else (unparsable body, odd status)   | `Backend`                     | alive     |
//!
//! Only a `never_reached_server` failure lets the retry layer send a write
//! again: a write cut after sending, or timed out, may have been applied.
//!
//! Inside `/v1/txn`, Consul reports ACL refusals as a 409 whose error text is
//! `Permission denied` / `ACL not found`; [`txn_failure`] maps those the same
//! way, so a transaction refused by ACLs is never mistaken for a failed check.

use std::time::Duration;

use anykv_core::Error;

/// The backend name carried by every error of this driver.
pub(crate) const BACKEND: &str = "consul";

/// What a non-success HTTP status means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StatusClass {
    /// The key or session does not exist.
    NotFound,
    /// The token is unknown to Consul.
    Unauthenticated,
    /// The token may not do this.
    PermissionDenied,
    /// The request itself is wrong (or too large).
    InvalidArgument,
    /// The agent or the servers cannot serve now.
    Unavailable,
    /// Anything else.
    Other,
}

/// Classifies a status code and body (the body decides between the 403s).
pub(crate) fn classify(status: u16, body: &str) -> StatusClass {
    match status {
        404 => StatusClass::NotFound,
        403 if body.contains("ACL not found") => StatusClass::Unauthenticated,
        403 => StatusClass::PermissionDenied,
        400 | 413 => StatusClass::InvalidArgument,
        429 | 500..=599 => StatusClass::Unavailable,
        _ => StatusClass::Other,
    }
}

/// The error for a non-success reply to `operation`. `404` maps to
/// `Backend` here: call sites where 404 means "absent" handle it first.
pub(crate) fn from_status(operation: &str, status: u16, body: &[u8]) -> Error {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let message = format!("{operation}: HTTP {status}: {}", clip(text));
    match classify(status, text) {
        StatusClass::Unauthenticated => Error::Unauthenticated {
            backend: BACKEND,
            message,
            source: None,
        },
        StatusClass::PermissionDenied => Error::PermissionDenied {
            backend: BACKEND,
            message,
            source: None,
        },
        StatusClass::InvalidArgument => Error::InvalidArgument {
            backend: BACKEND,
            message,
        },
        StatusClass::Unavailable => Error::Unavailable {
            backend: BACKEND,
            message,
            source: None,
        },
        StatusClass::NotFound | StatusClass::Other => Error::Backend {
            backend: BACKEND,
            message,
            source: None,
        },
    }
}

/// The error for a request that got no HTTP answer at all (connect refused,
/// reset, broken body): the agent is unreachable.
pub(crate) fn from_transport(
    operation: &'static str,
    deadline: Duration,
    err: reqwest::Error,
) -> Error {
    // reqwest's Display names the URL but never headers, so the token
    // (sent as X-Consul-Token) cannot leak through it.
    if err.is_connect() {
        // No connection (refused, connect timeout, TLS handshake): not a
        // byte of the request went out, so the retry layer may send even
        // a write again without applying it twice.
        return Error::not_sent(
            BACKEND,
            format!("{operation}: cannot connect to the consul agent"),
            err,
        );
    }
    if err.is_timeout() {
        return Error::Timeout {
            backend: BACKEND,
            operation,
            after: deadline,
        };
    }
    // Sent, at least partly (reset, broken reply): the agent may have
    // applied it, so only idempotent operations are retried.
    Error::unavailable(
        BACKEND,
        format!("{operation}: cannot reach the consul agent"),
        err,
    )
}

/// Maps a `/v1/txn` error text (HTTP 409) that is not a failed check:
/// ACL refusals. `None` means "an ordinary failed operation".
pub(crate) fn txn_failure(what: &str) -> Option<Error> {
    let message = format!("txn: {}", clip(what));
    if what.contains("ACL not found") {
        Some(Error::Unauthenticated {
            backend: BACKEND,
            message,
            source: None,
        })
    } else if what.contains("Permission denied") {
        Some(Error::PermissionDenied {
            backend: BACKEND,
            message,
            source: None,
        })
    } else {
        None
    }
}

/// A failure to build a request or decode a reply: a bug or an unexpected
/// server, never a reachability problem.
pub(crate) fn internal(
    message: impl Into<String>,
    source: impl Into<anykv_core::BoxError>,
) -> Error {
    Error::backend(BACKEND, message, source)
}

/// Keeps server texts short in error messages.
fn clip(text: &str) -> String {
    const MAX: usize = 300;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use anykv_core::ErrorKind;

    #[test]
    fn status_table() {
        let cases: &[(u16, &str, ErrorKind, bool)] = &[
            (403, "Permission denied", ErrorKind::PermissionDenied, false),
            (403, "ACL not found", ErrorKind::Unauthenticated, false),
            (400, "Missing key name", ErrorKind::InvalidArgument, false),
            (
                413,
                "Request body(533390 bytes) too large",
                ErrorKind::InvalidArgument,
                false,
            ),
            (429, "rate limit exceeded", ErrorKind::Unavailable, true),
            (500, "No cluster leader", ErrorKind::Unavailable, true),
            (502, "", ErrorKind::Unavailable, true),
            (503, "", ErrorKind::Unavailable, true),
            (404, "", ErrorKind::Backend, false),
            (418, "teapot", ErrorKind::Backend, false),
        ];
        for &(status, body, kind, unreachable) in cases {
            let e = from_status("get", status, body.as_bytes());
            assert_eq!(e.kind(), kind, "{status} {body}: {e}");
            assert_eq!(e.indicates_unreachable(), unreachable, "{status} {body}");
            assert!(e.to_string().contains(&status.to_string()), "{e}");
        }
    }

    #[test]
    fn classify_404_is_not_found() {
        assert_eq!(classify(404, ""), StatusClass::NotFound);
    }

    #[test]
    fn txn_acl_texts() {
        assert_eq!(
            txn_failure("Permission denied").map(|e| e.kind()),
            Some(ErrorKind::PermissionDenied)
        );
        assert_eq!(
            txn_failure("ACL not found").map(|e| e.kind()),
            Some(ErrorKind::Unauthenticated)
        );
        assert!(txn_failure("failed to set key \"a\", index is stale").is_none());
    }

    #[tokio::test]
    async fn refused_connection_is_unreachable() {
        // A port nobody listens on (bound, then released).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let err = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/v1/status/leader"))
            .send()
            .await
            .unwrap_err();
        let e = from_transport("probe", std::time::Duration::from_secs(1), err);
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.indicates_unreachable());
        assert!(
            e.never_reached_server(),
            "a refused connection sent nothing: a write may be retried"
        );
    }

    #[tokio::test]
    async fn a_request_cut_after_sending_may_have_been_applied() {
        // A server that reads the request, then closes without answering,
        // as an agent killed mid-request does.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            if let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut sock, &mut buf).await;
            }
        });
        let err = reqwest::Client::new()
            .put(format!("http://127.0.0.1:{port}/v1/txn"))
            .body("[]")
            .send()
            .await
            .unwrap_err();
        let e = from_transport("txn", std::time::Duration::from_secs(1), err);
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(!e.never_reached_server(), "{e}: the write may have applied");
    }

    #[tokio::test]
    async fn a_request_without_answer_is_a_timeout_that_may_have_applied() {
        let port = anykv_testkit::server::silent_port().await;
        let err = reqwest::Client::new()
            .put(format!("http://127.0.0.1:{port}/v1/txn"))
            .timeout(std::time::Duration::from_millis(200))
            .body("[]")
            .send()
            .await
            .unwrap_err();
        let e = from_transport("txn", std::time::Duration::from_millis(200), err);
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        assert!(!e.never_reached_server());
    }

    #[test]
    fn long_bodies_are_clipped_on_a_char_boundary() {
        let body = "é".repeat(400);
        let e = from_status("get", 500, body.as_bytes()).to_string();
        assert!(e.len() < 400, "{}", e.len());
    }
}
