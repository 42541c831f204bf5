//! One HTTP client for everything: consulrs' endpoint definitions executed on
//! a single `reqwest` 0.11 client, plus the calls consulrs lacks (`/v1/txn`,
//! `/v1/status/leader`) on that same client.
//!
//! Why not consulrs' own `kv::read`/`kv::set`/… helpers and its
//! `ConsulClient`: its middleware re-inserts already percent-encoded path
//! segments with `url`'s segment setter, which encodes the `%` again (a key
//! `ü` or `a b` reaches Consul as a different key); it `unwrap()`s the token
//! into a header value (a panic on a user-supplied string); its executor
//! turns every non-2xx reply into an error without headers, and blocking
//! queries need `X-Consul-Index` from the 404 of an absent key; and
//! `kv::set` takes only `&'static [u8]` values. So the driver builds
//! requests from consulrs' request types (`ReadKeyRequest`,
//! `CreateSessionRequest`, …, with their `Features` for consistency and
//! blocking) through rustify's `Endpoint::request`, against a base URL that
//! already ends in `/v1`, and sends them itself.

use std::time::Duration;

use anykv_core::{Error, Result};
use bytes::Bytes;
use consulrs::api::features::FeaturedEndpoint;
use reqwest::header::{HeaderName, HeaderValue};
use rustify::endpoint::Endpoint;
use serde::{Deserialize, Serialize};

use tokio::time::Instant;

use crate::{
    agents::{Agent, Agents, Pending},
    error::{self, BACKEND},
    settings::Settings,
};

/// `X-Consul-Token`.
static TOKEN_HEADER: HeaderName = HeaderName::from_static("x-consul-token");

/// A reply of any status, with the header blocking queries need.
#[derive(Debug)]
pub(crate) struct Reply {
    /// HTTP status.
    pub status: u16,
    /// `X-Consul-Index`, when present.
    pub index: Option<u64>,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// True for 2xx.
    pub(crate) fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Decodes a JSON body.
    pub(crate) fn json<T: serde::de::DeserializeOwned>(&self, operation: &str) -> Result<T> {
        serde_json::from_slice(&self.body)
            .map_err(|e| error::internal(format!("{operation}: unexpected reply from consul"), e))
    }

    /// The error for a non-success reply.
    pub(crate) fn error(&self, operation: &str) -> Error {
        error::from_status(operation, self.status, &self.body)
    }
}

/// Which share of the handle's connections a request uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Gets, puts, transactions, sessions, watch baselines: at most half
    /// of `max_conns - max_watch_conns` at once (see [`shares`]).
    Ops,
    /// Watch hubs' blocking queries (and their confirming re-reads): at
    /// most `max_watch_conns` at once; the watch planner keeps the number
    /// of hubs within it, so a hub never waits for another.
    Watch,
    /// A lock's blocking query (waiting for, or keeping, one lock): one
    /// connection per lock, outside both shares, so that held locks can
    /// never starve operations nor be starved by them. Session renewals
    /// (of locks, TTL keys' and anykv sessions) and the reads that confirm
    /// a session is gone go here too: brief requests every third of a
    /// TTL that must not wait behind a busy handle's operations.
    Lock,
}

/// The HTTP side of the driver.
pub(crate) struct Transport {
    http: reqwest::Client,
    /// Permits of [`Lane::Ops`] and [`Lane::Watch`]: in-flight requests
    /// (so connections, which the pool reuses) stay within `max_conns`.
    ops: tokio::sync::Semaphore,
    watch: tokio::sync::Semaphore,
    settings: Settings,
    token: Option<HeaderValue>,
    /// The agents of the URL, and the one requests go to now.
    agents: Agents,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// One `/v1/txn` operation (the `KV` kind; the driver needs no other).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct TxnOp {
    #[serde(rename = "KV")]
    pub kv: TxnKv,
}

/// The body of a KV transaction operation.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct TxnKv {
    pub verb: &'static str,
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flags: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

impl TxnOp {
    /// An operation without value.
    pub(crate) fn new(verb: &'static str, key: &str) -> TxnOp {
        TxnOp {
            kv: TxnKv {
                verb,
                key: key.to_owned(),
                value: None,
                flags: None,
                index: None,
                session: None,
            },
        }
    }

    /// Adds a value (base64-encoded, as `/v1/txn` wants it) and a fresh
    /// write nonce in `Flags`: Consul skips a write whose entry is identical
    /// to the stored one (same value, flags and session) without bumping
    /// `ModifyIndex`, and the contract wants every write to change the version.
    pub(crate) fn value(mut self, value: &[u8]) -> TxnOp {
        use base64::Engine;
        self.kv.value = Some(base64::engine::general_purpose::STANDARD.encode(value));
        self.kv.flags = Some(write_nonce());
        self
    }

    /// Adds an index (`cas`, `check-index`, `delete-cas`).
    pub(crate) fn index(mut self, index: u64) -> TxnOp {
        self.kv.index = Some(index);
        self
    }

    /// Adds a session (`lock`, `unlock`, `check-session`).
    pub(crate) fn session(mut self, session: &str) -> TxnOp {
        self.kv.session = Some(session.to_owned());
        self
    }
}

/// A random `Flags` value that makes every write differ from the stored entry.
pub(crate) fn write_nonce() -> u64 {
    rand::random()
}

/// A successful transaction's results, one per operation that returns an
/// entry (Consul returns none for deletes and checks that carry no entry).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct TxnResults {
    #[serde(default)]
    pub results: Option<Vec<TxnResult>>,
    /// Set for read-only transactions.
    #[serde(default)]
    pub index: Option<u64>,
}

/// One result entry.
#[derive(Debug, Deserialize)]
pub(crate) struct TxnResult {
    #[serde(rename = "KV")]
    pub kv: Option<consulrs::api::kv::common::KVPair>,
}

/// A rolled-back transaction: which operations failed and why.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct TxnErrors {
    #[serde(default)]
    pub errors: Option<Vec<TxnError>>,
}

/// One failed operation.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct TxnError {
    pub op_index: usize,
    pub what: String,
}

/// The outcome of `/v1/txn`: committed, or rolled back with reasons.
#[derive(Debug)]
pub(crate) enum TxnOutcome {
    /// Committed (or, for read-only transactions, evaluated).
    Committed(TxnResults),
    /// Rolled back; nothing was applied.
    RolledBack(Vec<TxnError>),
}

/// How `max_conns` is split: requests of watches in flight, other
/// requests in flight, idle connections kept. Their sum is `max_conns`, so
/// the connections open to the agent stay within it: a request takes an
/// idle connection when one is there, and the pool closes idle ones beyond
/// its share. hyper may open a connection for a request just before
/// another request's connection comes back to the pool (the extra one then
/// counts as idle, and is closed if idle ones are already at their share):
/// the idle share keeps one place free for that moment, so even then the
/// connections stay within `max_conns` (the coalescing test saw 33 of 32
/// once without it).
pub(crate) fn shares(settings: &Settings) -> (usize, usize, usize) {
    let watch = settings.max_watch_conns;
    let rest = settings.max_conns.saturating_sub(watch).max(1);
    let ops = rest.div_ceil(2);
    (watch, ops, (rest - ops).saturating_sub(1))
}

/// Yields after a request, before its permit is released (see `send`).
const HANDBACK_YIELDS: usize = 3;

/// The largest `/v1/txn` request body Consul accepts by default
/// (`txn_max_req_len`, 512 KiB).
pub(crate) const TXN_MAX_BODY: usize = 512 * 1024;

impl Transport {
    /// Builds the client: no overall request timeout (blocking queries wait
    /// minutes; every caller bounds its own wait), a connect timeout, TLS
    /// with the webpki roots plus `ca_file`.
    pub(crate) fn new(settings: Settings) -> Result<Transport> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(settings.timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            // In-flight requests plus idle connections stay within
            // `max_conns` (see `shares`): the pool closes extra idle ones.
            .pool_max_idle_per_host(shares(&settings).2);
        if let Some((path, pem)) = &settings.ca_file {
            let cert = reqwest::Certificate::from_pem(pem).map_err(|e| Error::InvalidArgument {
                backend: BACKEND,
                message: format!("ca_file {path} is not a PEM certificate: {e}"),
            })?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| error::internal("building the HTTP client", e))?;
        let token = match &settings.token {
            None => None,
            Some(t) => {
                let mut v =
                    HeaderValue::from_str(t.expose()).map_err(|_| Error::InvalidArgument {
                        backend: BACKEND,
                        message: "token is not a valid HTTP header value".into(),
                    })?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        Ok(Transport {
            http,
            ops: tokio::sync::Semaphore::new(shares(&settings).1),
            watch: tokio::sync::Semaphore::new(shares(&settings).0),
            agents: Agents::new(&settings.bases)?,
            settings,
            token,
        })
    }

    /// The driver settings.
    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Executes a consulrs endpoint; any status is returned as a [`Reply`].
    pub(crate) async fn call<E>(&self, operation: &'static str, endpoint: &E) -> Result<Reply>
    where
        E: Endpoint + FeaturedEndpoint,
    {
        self.call_within(operation, endpoint, self.settings.timeout, Lane::Ops)
            .await
    }

    /// [`call`](Self::call) with its own deadline.
    pub(crate) async fn call_within<E>(
        &self,
        operation: &'static str,
        endpoint: &E,
        deadline: Duration,
        lane: Lane,
    ) -> Result<Reply>
    where
        E: Endpoint + FeaturedEndpoint,
    {
        self.send(operation, deadline, lane, |agent| {
            let mut req = endpoint
                .request(&agent.base)
                .map_err(|e| error::internal(format!("{operation}: building the request"), e))?;
            if let Some(features) = endpoint.features() {
                features.process(&mut req);
            }
            reqwest::Request::try_from(req)
                .map_err(|e| error::internal(format!("{operation}: building the request"), e))
        })
        .await
    }

    /// A blocking query, bounded by `deadline` (its wait plus slack). If
    /// requests move to another agent meanwhile (the one it waits on failed
    /// to answer someone else), it is sent again to the new agent within
    /// the same deadline, rather than waiting out a dead or frozen one.
    pub(crate) async fn call_blocking<E>(
        &self,
        operation: &'static str,
        endpoint: &E,
        deadline: Duration,
        lane: Lane,
    ) -> Result<Reply>
    where
        E: Endpoint + FeaturedEndpoint,
    {
        let end = Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    backend: BACKEND,
                    operation,
                    after: deadline,
                });
            }
            let mut moved = self.agents.moved();
            tokio::select! {
                reply = self.call_within(operation, endpoint, left, lane) => return reply,
                // The sender lives as long as `self`: an error cannot happen.
                _ = moved.changed() => {}
            }
        }
    }

    /// Sends a request built for the current agent by `build`, through the
    /// one client. Every request is bounded: besides the layers'
    /// per-operation timeout, the driver's own background requests (lock
    /// renewals, releases, watch loops) must not hang on a frozen agent
    /// either. A failure the agent is to blame for moves later requests to
    /// the next agent of the URL.
    async fn send(
        &self,
        operation: &'static str,
        deadline: Duration,
        lane: Lane,
        build: impl FnOnce(&Agent) -> Result<reqwest::Request>,
    ) -> Result<Reply> {
        // Waiting for a permit counts against the deadline: a handle whose
        // share is busy fails like a slow agent, it does not open more.
        let started = Instant::now();
        let semaphore = match lane {
            Lane::Ops => Some(&self.ops),
            Lane::Watch => Some(&self.watch),
            Lane::Lock => None,
        };
        let _permit = match semaphore {
            None => None,
            Some(s) => match tokio::time::timeout(deadline, s.acquire()).await {
                Ok(Ok(p)) => Some(p),
                // The semaphores are never closed.
                Ok(Err(_)) | Err(_) => {
                    return Err(Error::Timeout {
                        backend: BACKEND,
                        operation,
                        after: deadline,
                    });
                }
            },
        };
        let total = deadline;
        let deadline = deadline.saturating_sub(started.elapsed());
        if deadline.is_zero() {
            return Err(Error::Timeout {
                backend: BACKEND,
                operation,
                after: total,
            });
        }
        let (index, agent) = self.agents.pick();
        let mut req = build(agent)?;
        *req.timeout_mut() = Some(deadline);
        if let Some(dc) = &self.settings.dc {
            req.url_mut().query_pairs_mut().append_pair("dc", dc);
        }
        if let Some(token) = &self.token {
            req.headers_mut()
                .insert(TOKEN_HEADER.clone(), token.clone());
        }
        let pending = Pending::new(&self.agents, index, deadline);
        let resp = match self.http.execute(req).await {
            Ok(resp) => resp,
            Err(e) => {
                pending.finish(true);
                return Err(error::from_transport(operation, deadline, e));
            }
        };
        let status = resp.status().as_u16();
        let index = resp
            .headers()
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = match resp.bytes().await {
            Ok(body) => body,
            Err(e) => {
                pending.finish(true);
                return Err(error::from_transport(operation, deadline, e));
            }
        };
        // 5xx/429: no leader, not ready, overloaded: another agent may serve.
        pending.finish(error::classify(status, "") == error::StatusClass::Unavailable);
        if _permit.is_some() {
            // hyper hands the connection back to the pool from a task of
            // its own once the body is done; letting it run before the
            // permit goes to the next request lets that request reuse the
            // connection instead of racing it with a new one.
            for _ in 0..HANDBACK_YIELDS {
                tokio::task::yield_now().await;
            }
        }
        Ok(Reply {
            status,
            index,
            body,
        })
    }

    /// `PUT /v1/txn`: all operations or none. A body over Consul's limit is
    /// refused before sending.
    pub(crate) async fn txn(&self, ops: &[TxnOp]) -> Result<TxnOutcome> {
        let body = serde_json::to_vec(ops).map_err(|e| error::internal("txn: encoding", e))?;
        if body.len() > TXN_MAX_BODY {
            return Err(Error::InvalidArgument {
                backend: BACKEND,
                message: format!(
                    "transaction of {} bytes (values travel base64-encoded) exceeds Consul's \
                     txn_max_req_len of {TXN_MAX_BODY} bytes",
                    body.len()
                ),
            });
        }
        let reply = self
            .send("txn", self.settings.timeout, Lane::Ops, |agent| {
                let mut req = reqwest::Request::new(reqwest::Method::PUT, agent.txn.clone());
                *req.body_mut() = Some(body.into());
                Ok(req)
            })
            .await?;
        match reply.status {
            200 => Ok(TxnOutcome::Committed(reply.json("txn")?)),
            409 => {
                let errs: TxnErrors = reply.json("txn")?;
                let errs = errs.errors.unwrap_or_default();
                if let Some(e) = errs.iter().find_map(|e| error::txn_failure(&e.what)) {
                    return Err(e);
                }
                Ok(TxnOutcome::RolledBack(errs))
            }
            _ => Err(reply.error("txn")),
        }
    }

    /// `GET /v1/status/leader`: the address of the Raft leader, empty if none.
    pub(crate) async fn leader(&self) -> Result<String> {
        let reply = self
            .send("probe", self.settings.timeout, Lane::Ops, |agent| {
                Ok(reqwest::Request::new(
                    reqwest::Method::GET,
                    agent.leader.clone(),
                ))
            })
            .await?;
        if !reply.ok() {
            return Err(reply.error("probe"));
        }
        reply.json::<String>("probe")
    }
}
