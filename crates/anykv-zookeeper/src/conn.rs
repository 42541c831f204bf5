//! The connection: URL options, and one ZooKeeper session shared by every
//! operation, watch and lock of a store, opened on first use and opened
//! again after it expires.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anykv_core::{Config, Error, Result, Secret};
use tokio::sync::watch;
use zookeeper_client as zk;

use crate::error::{self, BACKEND};

/// Query keys this driver reads (besides the common ones).
pub(crate) const PARAMS: &[&str] = &["session_timeout", "ttl_check_interval", "consistency"];

/// Session timeout asked of the server when the URL gives none. The server
/// clamps it to its `[minSessionTimeout, maxSessionTimeout]` (4 s – 40 s with
/// the default tick).
pub(crate) const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's default `znode.container.checkIntervalMs`.
pub(crate) const DEFAULT_TTL_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// Connection attempt bound when the URL gives no `timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a read guarantees (`consistency=`; see the crate docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Consistency {
    /// ZooKeeper's own: the server the session is connected to answers,
    /// possibly behind the leader.
    Sequential,
    /// `sync` on the path first: the server catches up with the leader.
    Linearizable,
}

impl Consistency {
    fn parse(config: &Config) -> Result<Consistency> {
        match config.param("consistency") {
            None | Some("sequential") => Ok(Consistency::Sequential),
            Some("linearizable") => Ok(Consistency::Linearizable),
            Some(other) => Err(config.invalid(format!(
                "consistency={other}: expected sequential or linearizable"
            ))),
        }
    }
}

/// Options read from the URL.
#[derive(Clone)]
pub(crate) struct Settings {
    /// `host:port,host:port` as zookeeper-client takes it.
    pub(crate) connect_string: String,
    /// Session timeout asked of the server.
    pub(crate) session_timeout: Duration,
    /// Bound of one attempt to open a session (the URL's `timeout`).
    pub(crate) connect_timeout: Duration,
    /// Digest credentials, `user:password`.
    pub(crate) digest: Option<(String, Secret)>,
    /// The server's container/TTL check interval, as the operator states it.
    pub(crate) ttl_check_interval: Duration,
    /// What reads guarantee.
    pub(crate) consistency: Consistency,
    /// The URL with secrets redacted.
    pub(crate) redacted: String,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("url", &self.redacted)
            .field("session_timeout", &self.session_timeout)
            .field("digest_user", &self.digest.as_ref().map(|(u, _)| u))
            .field("consistency", &self.consistency)
            .finish()
    }
}

impl Settings {
    /// Reads the driver's options from a parsed URL.
    pub(crate) fn from_config(config: &Config) -> Result<Settings> {
        if config.hosts.is_empty() {
            return Err(config.invalid("no ZooKeeper server given (zk://host:port/prefix)"));
        }
        let mut hosts = Vec::with_capacity(config.hosts.len());
        for h in &config.hosts {
            // zookeeper-client's default port is 2181 as well, but say it.
            if h.contains(':') {
                hosts.push(h.clone());
            } else {
                hosts.push(format!("{h}:2181"));
            }
        }
        let session_timeout = match config.duration_param("session_timeout")? {
            Some(t) if t.is_zero() => {
                return Err(config.invalid("session_timeout must be positive"));
            }
            Some(t) => t,
            None => DEFAULT_SESSION_TIMEOUT,
        };
        let connect_timeout = config
            .duration_param("timeout")?
            .filter(|t| !t.is_zero())
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let ttl_check_interval = match config.duration_param("ttl_check_interval")? {
            Some(t) if t.is_zero() => {
                return Err(config.invalid("ttl_check_interval must be positive"));
            }
            Some(t) => t,
            None => DEFAULT_TTL_CHECK_INTERVAL,
        };
        let digest = match (&config.username, &config.password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            (Some(_), None) => {
                return Err(config.invalid("digest auth needs user:password@"));
            }
            _ => None,
        };
        Ok(Settings {
            connect_string: hosts.join(","),
            session_timeout,
            connect_timeout,
            digest,
            ttl_check_interval,
            consistency: Consistency::parse(config)?,
            redacted: config.redacted.clone(),
        })
    }
}

/// True while the client is connected to a server (not reconnecting).
pub(crate) fn is_connected(client: &zk::Client) -> bool {
    matches!(
        client.state(),
        zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly
    )
}

/// Resolves once the session behind `states` has ended (expired, closed,
/// refused). Disconnections on the way are not an end: the client
/// reconnects and, within the session timeout, the session survives.
pub(crate) async fn ended(states: &mut zk::StateWatcher) {
    while !states.state().is_terminated() {
        states.changed().await;
    }
}

/// `Unavailable` for a request the driver did not send: the retry layer
/// may retry it, a write included ([`Error::never_reached_server`]).
pub(crate) fn not_connected(message: &str) -> Error {
    Error::not_sent(BACKEND, message, message.to_owned())
}

/// One ZooKeeper session.
pub(crate) struct Session {
    /// The client; clones share the session.
    pub(crate) client: zk::Client,
}

impl Session {
    /// True while the session can still serve requests (possibly after a
    /// reconnect): not expired, closed or refused.
    pub(crate) fn usable(&self) -> bool {
        !self.client.state().is_terminated()
    }
}

/// The shared session of a store, opened lazily.
pub(crate) struct Conn {
    pub(crate) settings: Settings,
    current: Mutex<Option<Arc<Session>>>,
    connecting: tokio::sync::Mutex<()>,
    /// Bumped by `close()`: running watches end with `Cancelled`.
    closed: watch::Sender<u64>,
}

impl Conn {
    pub(crate) fn new(settings: Settings) -> Conn {
        Conn {
            settings,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            closed: watch::channel(0).0,
        }
    }

    /// The current session, opening one if there is none or it expired.
    ///
    /// Opening is bounded by the connect timeout and fails fast when every
    /// server refuses the connection, so an operation against a dead
    /// endpoint never hangs.
    ///
    /// While the session is disconnected (its client reconnecting in the
    /// background), this fails at once with [`not_connected`] instead of
    /// handing a request to zookeeper-client, which would queue it until a
    /// reconnect (or the attempt's timeout) and send it then — possibly
    /// after the caller gave up on it. Every error from here says the
    /// request was never sent, so the retry layer may retry even a write.
    pub(crate) async fn session(&self) -> Result<Arc<Session>> {
        let session = self.open().await?;
        if !is_connected(&session.client) {
            return Err(not_connected(
                "the session is disconnected, reconnecting in the background",
            ));
        }
        Ok(session)
    }

    /// The current session (connected or reconnecting), opening one if
    /// there is none or it expired.
    async fn open(&self) -> Result<Arc<Session>> {
        if let Some(s) = self.live() {
            return Ok(s);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(s) = self.live() {
            return Ok(s);
        }
        let session = Arc::new(Session {
            client: self.connect().await?,
        });
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(session.clone());
        Ok(session)
    }

    /// A session of its own (the watch hub's), not the store's shared one:
    /// its reads never wait behind the store's writes, which ZooKeeper
    /// serves in order per session.
    pub(crate) async fn open_separate(&self) -> Result<Arc<Session>> {
        Ok(Arc::new(Session {
            client: self.connect().await?,
        }))
    }

    /// The current session if it is usable.
    fn live(&self) -> Option<Arc<Session>> {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        current.as_ref().filter(|s| s.usable()).cloned()
    }

    /// Id of the current session (0 if none), as the server prints it in `cons`.
    pub(crate) fn session_id(&self) -> i64 {
        self.live().map(|s| s.client.session_id().0).unwrap_or(0)
    }

    /// The current session's id and password.
    pub(crate) fn session_info(&self) -> Option<zk::SessionInfo> {
        self.live().map(|s| s.client.session().clone())
    }

    async fn connect(&self) -> Result<zk::Client> {
        self.connect_with(self.settings.session_timeout).await
    }

    /// A new client on a session of its own asking for `session_timeout`
    /// (the server clamps it to its `[minSessionTimeout,
    /// maxSessionTimeout]`; the client reports the negotiated one). Opening
    /// is bounded and fails as [`Conn::session`] does.
    pub(crate) async fn connect_with(&self, session_timeout: Duration) -> Result<zk::Client> {
        let s = &self.settings;
        let mut connector = zk::Client::connector()
            .with_session_timeout(session_timeout)
            // Give up at once when every server refuses the connection,
            // instead of cycling until the session timeout.
            .with_fail_eagerly();
        if let Some((user, password)) = &s.digest {
            connector =
                connector.with_auth("digest", format!("{user}:{}", password.expose()).as_bytes());
        }
        // No request of the operation is sent before a session exists, so
        // an unreachable server here is "never sent".
        match tokio::time::timeout(s.connect_timeout, connector.connect(&s.connect_string)).await {
            Ok(Ok(client)) => {
                tracing::debug!(session = %client.session_id(), "zookeeper: session opened");
                Ok(client)
            }
            Ok(Err(e)) => {
                let mapped = error::map(e.clone(), "connect", &s.connect_string);
                if mapped.indicates_unreachable() {
                    Err(Error::not_sent(BACKEND, mapped.to_string(), e))
                } else {
                    Err(mapped)
                }
            }
            Err(_) => Err(not_connected(&format!(
                "no session with {} within {:?}",
                s.connect_string, s.connect_timeout
            ))),
        }
    }

    /// Drops the session after an error that says it is gone, so the next
    /// operation opens a new one.
    pub(crate) fn forget(&self, session: &Arc<Session>) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, session)) {
            *current = None;
        }
    }

    /// Ends running watches (with `Cancelled`) and drops the session; the
    /// store stays usable and opens a new session on its next operation.
    pub(crate) fn close(&self) {
        self.closed.send_modify(|epoch| *epoch += 1);
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// A receiver that changes when `close()` is called.
    pub(crate) fn closed(&self) -> watch::Receiver<u64> {
        self.closed.subscribe()
    }
}
