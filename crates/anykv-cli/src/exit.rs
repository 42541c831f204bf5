//! Exit codes and the one-line error messages behind them.
//!
//! Every failure of the tool becomes a [`Failure`]: an exit code from the
//! table in `anykv --help` and one line for stderr. The mapping from
//! [`anykv::Error`] lives here so that each command reports the same error
//! the same way.

use std::{error::Error as _, fmt};

use anykv::{Error, ErrorKind};

/// Success.
pub const OK: u8 = 0;
/// Not found, not alive, or another backend error.
pub const FAILURE: u8 = 1;
/// Bad arguments, key, URL or option (the input was rejected).
pub const USAGE: u8 = 2;
/// A write condition (`--if-absent`, `--if-version`) failed.
pub const CONDITION: u8 = 3;
/// The backend could not be reached (unavailable, timeout, data loss).
pub const UNREACHABLE: u8 = 4;
/// The lock was not acquired in time, or was lost.
pub const LOCK: u8 = 5;
/// The command given to `lock` could not be executed (shell convention).
pub const CANNOT_EXECUTE: u8 = 126;
/// The command given to `lock` was not found (shell convention).
pub const COMMAND_NOT_FOUND: u8 = 127;

/// A failed run: the exit code and the line printed on stderr (none when
/// the tool should end quietly, e.g. stdout was closed by `| head`).
#[derive(Debug)]
pub struct Failure {
    /// Process exit code.
    pub code: u8,
    /// The single line for stderr, if any.
    pub message: Option<String>,
}

impl Failure {
    /// A failure with a message.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: Some(one_line(&message.into())),
        }
    }

    /// A usage error (exit 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Failure::new(USAGE, message)
    }

    /// Ends the process with `code` and prints nothing.
    pub fn quiet(code: u8) -> Self {
        Failure {
            code,
            message: None,
        }
    }

    /// "not found: KEY", exit 1: the message the issue asks for.
    pub fn not_found(key: &str) -> Self {
        Failure::new(FAILURE, format!("not found: {key}"))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message.as_deref().unwrap_or(""))
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let code = code_for(e.kind());
        let message = match &e {
            // The caller knows which backend it talks to; these read best bare.
            Error::NotFound { key, .. } => format!("not found: {key}"),
            Error::AlreadyExists { key, .. } => format!("already exists: {key}"),
            _ => with_sources(&e),
        };
        Failure::new(code, message)
    }
}

/// Writing to stdout failed: a closed pipe ends the tool quietly (as `cat`
/// does under `| head`), anything else is reported.
impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            Failure::quiet(OK)
        } else {
            Failure::new(FAILURE, format!("cannot write output: {e}"))
        }
    }
}

/// The exit code of an error kind (see the table in `anykv --help`).
pub fn code_for(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::NotFound => FAILURE,
        ErrorKind::AlreadyExists | ErrorKind::Conflict => CONDITION,
        ErrorKind::InvalidKey
        | ErrorKind::InvalidArgument
        | ErrorKind::ValueTooLarge
        | ErrorKind::Unsupported
        | ErrorKind::UnknownBackend
        | ErrorKind::InvalidUrl => USAGE,
        ErrorKind::Unavailable | ErrorKind::Timeout | ErrorKind::DataLoss => UNREACHABLE,
        ErrorKind::LockLost => LOCK,
        _ => FAILURE,
    }
}

/// The error and the deepest readable cause in its source chain, on one
/// line. Client libraries often put a `Debug` dump of their own cause in
/// their `Display` (etcd-client's gRPC status does, with tonic's transport
/// error inside), while the root cause is usually a plain OS or protocol
/// message ("Connection refused (os error 111)"); dumps are skipped.
fn with_sources(e: &Error) -> String {
    let mut line = e.to_string();
    let mut cause = None;
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if looks_plain(&text) {
            cause = Some(text);
        }
        source = s.source();
    }
    if let Some(text) = cause
        && !line.contains(&text)
    {
        line.push_str(": ");
        line.push_str(&text);
    }
    line
}

/// A human message rather than a `Debug` rendering of a struct.
fn looks_plain(text: &str) -> bool {
    !text.is_empty() && text.len() <= 200 && !text.contains(['{', '}'])
}

/// Folds a multi-line message (some client errors carry newlines) into one line.
fn one_line(s: &str) -> String {
    s.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use anykv::{Key, Version};

    #[test]
    fn table() {
        let b = "test";
        let cases: Vec<(Error, u8, &str)> = vec![
            (
                Error::NotFound {
                    backend: b,
                    key: "a/b".into(),
                },
                FAILURE,
                "not found: a/b",
            ),
            (
                Error::AlreadyExists {
                    backend: b,
                    key: "a".into(),
                },
                CONDITION,
                "already exists: a",
            ),
            (
                Error::Conflict {
                    backend: b,
                    key: "a".into(),
                    expected: Some(Version::new(1)),
                    actual: Some(Version::new(2)),
                },
                CONDITION,
                "test: conflict on a: expected version 1, found 2",
            ),
            (
                Key::new("a//b").map(|_| ()).unwrap_err(),
                USAGE,
                "invalid key \"a//b\": must not contain an empty segment ('//')",
            ),
            (
                Error::unavailable(b, "connect failed", "connection refused\nretry later"),
                UNREACHABLE,
                "test: unavailable: connect failed: connection refused retry later",
            ),
            (
                Error::unavailable(b, "get: tcp connect error", Nested),
                UNREACHABLE,
                "test: unavailable: get: tcp connect error: connection refused",
            ),
            (
                Error::UnknownBackend {
                    name: "nope".into(),
                    available: vec!["memory".into(), "redb".into()],
                },
                USAGE,
                "unknown backend \"nope\"; available: memory, redb",
            ),
            (
                Error::LockLost {
                    backend: b,
                    key: "l".into(),
                },
                LOCK,
                "test: lock lost: l",
            ),
            (Error::backend(b, "boom", "boom"), FAILURE, "test: boom"),
        ];
        for (e, code, msg) in cases {
            let f = Failure::from(e);
            assert_eq!((f.code, f.message.as_deref()), (code, Some(msg)));
        }
    }

    /// A client error whose Display embeds a Debug dump of its cause.
    #[derive(Debug)]
    struct Nested;
    impl fmt::Display for Nested {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("status: Unavailable, source: Os { code: 111 }")
        }
    }
    impl std::error::Error for Nested {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            static ROOT: std::sync::LazyLock<std::io::Error> = std::sync::LazyLock::new(|| {
                std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused")
            });
            Some(&*ROOT)
        }
    }

    #[test]
    fn broken_pipe_is_quiet_success() {
        let f = Failure::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert_eq!((f.code, f.message), (OK, None));
    }
}
