//! Consul sessions, for TTL keys, locks and anykv sessions (consulrs'
//! session requests).
//!
//! Consul accepts session TTLs from 10 s to 24 h and invalidates a session
//! 2 × TTL after its last renewal (the server multiplies the TTL by two to
//! absorb clock and network slack). A key (or lock) that should live `t`
//! therefore gets a session TTL of `max(10 s, ⌈t/2⌉)`. An anykv session
//! promises that its keys outlive its last renewal by its TTL, so it gets
//! the TTL itself (see [`ephemeral_ttl`]).

use std::{sync::Arc, time::Duration};

use anykv_core::{Error, Result};
use consulrs::api::features::{ConsistencyMode, Features};
use consulrs::api::session::{
    common::SessionEntry,
    requests::{
        CreateSessionRequest, DeleteSessionRequest, ReadSessionRequest, RenewSessionRequest,
    },
    responses::CreateSessionResponse,
};

use crate::{
    Inner,
    error::{self, BACKEND},
    http::{Lane, Transport},
};

/// Consul's shortest session TTL.
const MIN_SESSION_TTL: Duration = Duration::from_secs(10);
/// Consul's longest session TTL.
const MAX_SESSION_TTL: Duration = Duration::from_secs(86_400);
/// Name of the sessions that carry key TTLs (only these are destroyed when
/// found on a key being overwritten or deleted).
pub(crate) const TTL_SESSION_NAME: &str = "anykv-ttl";
/// Name of lock sessions.
pub(crate) const LOCK_SESSION_NAME: &str = "anykv-lock";
/// Name of the sessions behind `Store::session` (ephemeral keys).
pub(crate) const EPHEMERAL_SESSION_NAME: &str = "anykv-session";

/// What a session is for.
#[derive(Clone, Copy, Debug)]
pub(crate) enum SessionKind {
    /// Carries a key's TTL: no health checks (only the TTL ends it), no lock-delay.
    Ttl,
    /// Backs a lock: the agent's `serfHealth` check (a failed node frees its
    /// locks, as with Consul's own locks) and the configured lock-delay.
    Lock,
    /// Backs an anykv session (ephemeral keys): the TTL as given (see
    /// [`ephemeral_ttl`]), no health checks (only the TTL and `close` end
    /// it, so that its keys live exactly as the declared bounds say), and
    /// no lock-delay, so that a key of a dead session (a dead leader's
    /// election key) can be taken again at once.
    Ephemeral,
}

/// Longest TTL the driver can honour: twice Consul's longest session TTL.
pub(crate) fn check_ttl(ttl: Duration) -> Result<()> {
    if ttl > MAX_SESSION_TTL * 2 {
        return Err(Error::InvalidArgument {
            backend: BACKEND,
            message: format!(
                "ttl {} is longer than Consul can keep a key alive unattended (48h)",
                humantime_secs(ttl)
            ),
        });
    }
    Ok(())
}

/// The session TTL for a key or lock that should live `ttl`.
pub(crate) fn session_ttl(ttl: Duration) -> Duration {
    // Whole seconds, rounded up: the key may outlive its TTL, never the reverse.
    let half_ms = ttl.as_millis().div_ceil(2);
    let secs = u64::try_from(half_ms.div_ceil(1000)).unwrap_or(u64::MAX);
    Duration::from_secs(secs).clamp(MIN_SESSION_TTL, MAX_SESSION_TTL)
}

/// The Consul TTL of an anykv session asked to live `ttl`: whole seconds,
/// rounded up, at least Consul's 10 s; over its 24 h is `InvalidArgument`.
/// Consul deletes the keys of a dead session between one and two of these
/// after its last renewal (2 × TTL in practice), so they outlive the
/// process by at least the TTL and at most twice it.
pub(crate) fn ephemeral_ttl(ttl: Duration) -> Result<Duration> {
    if ttl > MAX_SESSION_TTL {
        return Err(Error::InvalidArgument {
            backend: BACKEND,
            message: format!(
                "session ttl {} is longer than Consul's longest session TTL (24h)",
                humantime_secs(ttl)
            ),
        });
    }
    let secs = u64::try_from(ttl.as_millis().div_ceil(1000)).unwrap_or(u64::MAX);
    Ok(Duration::from_secs(secs).clamp(MIN_SESSION_TTL, MAX_SESSION_TTL))
}

fn humantime_secs(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

fn build_err(what: &str, e: impl std::fmt::Display) -> Error {
    error::internal(format!("{what}: building the request"), e.to_string())
}

/// A session the caller owns: destroyed in the background when dropped,
/// unless [`keep`](Self::keep) hands it over to the key or lock.
pub(crate) struct SessionGuard {
    http: Arc<Transport>,
    id: String,
    armed: bool,
}

impl SessionGuard {
    /// The session id.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// The session now backs a key or lock: do not destroy it.
    pub(crate) fn keep(mut self) -> String {
        self.armed = false;
        std::mem::take(&mut self.id)
    }

    /// Destroys the session now and waits for it.
    pub(crate) async fn destroy(mut self) {
        self.armed = false;
        if let Err(e) = destroy(&self.http, &self.id).await {
            tracing::debug!(error = %e, "destroying an unused session failed; it will expire");
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (http, id) = (self.http.clone(), std::mem::take(&mut self.id));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = destroy(&http, &id).await;
            });
        }
    }
}

impl Inner {
    /// Creates a session for a key or lock that should live `ttl`.
    pub(crate) async fn create_session(
        &self,
        kind: SessionKind,
        ttl: Duration,
    ) -> Result<SessionGuard> {
        let secs = match kind {
            SessionKind::Ttl | SessionKind::Lock => session_ttl(ttl).as_secs(),
            SessionKind::Ephemeral => ephemeral_ttl(ttl)?.as_secs(),
        };
        let mut req = CreateSessionRequest::builder();
        req.behavior("delete").ttl(format!("{secs}s"));
        match kind {
            SessionKind::Ttl => {
                req.name(TTL_SESSION_NAME)
                    .lock_delay("0s")
                    .node_checks(Vec::<String>::new());
            }
            SessionKind::Lock => {
                let delay = self.http.settings().lock_delay;
                req.name(LOCK_SESSION_NAME)
                    .lock_delay(format!("{}ms", delay.as_millis()))
                    .node_checks(vec!["serfHealth".to_owned()]);
            }
            SessionKind::Ephemeral => {
                req.name(EPHEMERAL_SESSION_NAME)
                    .lock_delay("0s")
                    .node_checks(Vec::<String>::new());
            }
        }
        let req = req.build().map_err(|e| build_err("session create", e))?;
        let reply = self.http.call("session create", &req).await?;
        if !reply.ok() {
            return Err(reply.error("session create"));
        }
        let created: CreateSessionResponse = reply.json("session create")?;
        Ok(SessionGuard {
            http: self.http.clone(),
            id: created.id,
            armed: true,
        })
    }

    /// Destroys a TTL session found on a key that no longer needs it (an
    /// overwritten or deleted key), in the background. Sessions not created
    /// for TTLs (someone's lock) are left alone.
    pub(crate) fn forget_ttl_session(&self, id: String) {
        let http = self.http.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Ok(Some(s)) = info(&http, &id).await
                    && s.name.as_deref() == Some(TTL_SESSION_NAME)
                {
                    let _ = destroy(&http, &id).await;
                }
            });
        }
    }
}

/// Renews a session; `Ok(false)` once Consul no longer knows it. Renewals
/// go outside the operations' share of connections ([`Lane::Lock`]): a
/// handle busy with operations or watches must not let its sessions and
/// locks expire.
pub(crate) async fn renew(http: &Transport, id: &str) -> Result<bool> {
    let req = RenewSessionRequest::builder()
        .uuid(id)
        .build()
        .map_err(|e| build_err("session renew", e))?;
    let reply = http
        .call_within("session renew", &req, http.settings().timeout, Lane::Lock)
        .await?;
    match reply.status {
        200 => Ok(!reply.json::<Vec<SessionEntry>>("session renew")?.is_empty()),
        404 => Ok(false),
        _ => Err(reply.error("session renew")),
    }
}

/// Destroys a session (keys it still holds are deleted: `Behavior=delete`).
pub(crate) async fn destroy(http: &Transport, id: &str) -> Result<()> {
    let req = DeleteSessionRequest::builder()
        .uuid(id)
        .build()
        .map_err(|e| build_err("session destroy", e))?;
    let reply = http.call("session destroy", &req).await?;
    if reply.ok() || reply.status == 404 {
        Ok(())
    } else {
        Err(reply.error("session destroy"))
    }
}

/// A session's record, `None` if it no longer exists, from a `consistent`
/// read (a server replaying its log after a restart, or a deposed leader,
/// may not know a live session yet), outside the operations' share like
/// [`renew`], since it confirms a renewal's answer.
pub(crate) async fn info(http: &Transport, id: &str) -> Result<Option<SessionEntry>> {
    let req = ReadSessionRequest::builder()
        .uuid(id)
        .features(Features {
            mode: Some(ConsistencyMode::CONSISTENT),
            ..Features::default()
        })
        .build()
        .map_err(|e| build_err("session info", e))?;
    let reply = http
        .call_within("session info", &req, http.settings().timeout, Lane::Lock)
        .await?;
    match reply.status {
        200 => Ok(reply
            .json::<Option<Vec<SessionEntry>>>("session info")?
            .and_then(|v| v.into_iter().next())),
        404 => Ok(None),
        _ => Err(reply.error("session info")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ttl_is_half_the_key_ttl_within_consul_bounds() {
        let s = Duration::from_secs;
        assert_eq!(session_ttl(Duration::from_millis(1500)), s(10));
        assert_eq!(session_ttl(s(1)), s(10));
        assert_eq!(session_ttl(s(20)), s(10));
        assert_eq!(session_ttl(s(21)), s(11));
        assert_eq!(session_ttl(s(60)), s(30));
        assert_eq!(session_ttl(Duration::from_millis(60_500)), s(31));
        assert_eq!(session_ttl(s(172_800)), s(86_400));
        assert!(check_ttl(s(172_800)).is_ok());
        assert!(check_ttl(s(172_801)).is_err());
    }

    #[test]
    fn ephemeral_ttl_is_the_ttl_within_consul_bounds() {
        let s = Duration::from_secs;
        assert_eq!(ephemeral_ttl(s(1)).ok(), Some(s(10)));
        assert_eq!(ephemeral_ttl(s(10)).ok(), Some(s(10)));
        assert_eq!(
            ephemeral_ttl(Duration::from_millis(15_001)).ok(),
            Some(s(16))
        );
        assert_eq!(ephemeral_ttl(s(86_400)).ok(), Some(s(86_400)));
        assert!(ephemeral_ttl(s(86_401)).is_err());
    }
}
