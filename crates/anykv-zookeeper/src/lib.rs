//! ZooKeeper driver for anykv, on [`zookeeper_client`].
//!
//! URL: `zk://[user:password@]host:port[,host:port…]/prefix?session_timeout=10s&timeout=5s`
//! (scheme `zookeeper://` too). `user:password@` adds ZooKeeper `digest`
//! authentication; the password never appears in `Debug`, logs or errors.
//! Options:
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `session_timeout` | 10s | session timeout asked of the server (it clamps to its min/max); a dead lock holder's lock frees after it |
//! | `timeout` | 5s | per-operation timeout (layers) and bound of opening a session |
//! | `ttl_check_interval` | 60s | the server's `znode.container.checkIntervalMs`: when expired TTL znodes are really removed |
//! | `consistency` | `sequential` | `linearizable`: `sync` before every read (see *Reads* below) |
//!
//! TLS is not offered: zookeeper-client's `tls` feature builds rustls with
//! the aws-lc-rs provider only, whose aws-lc-sys carries the OpenSSL
//! license, outside the workspace's license policy (deny.toml). An option
//! such as `tls=true` is rejected as unknown, never ignored.
//!
//! # How the contract maps onto ZooKeeper
//!
//! * **Keys are znodes.** Key `a/b` in namespace `ns` is znode `/ns/a/b`;
//!   the value is the znode's data, byte for byte, so `zkCli.sh get /ns/a/b`
//!   shows it and anykv reads what other clients wrote (an empty znode they
//!   created is a key with an empty value). ZooKeeper's own `/zookeeper`
//!   subtree is never a key, never listed, watched or deleted.
//! * **Implicit parents are not keys.** Writing `a/b/c` creates missing
//!   parents as persistent znodes holding the marker `\0anykv\0d`; `get`
//!   says absent for them and `list` skips them, while an explicitly written
//!   empty value is a key. A value that itself starts with `\0anykv\0` is
//!   stored escaped (`\0anykv\0v` + value). Deleting a key removes the
//!   markers above it left without children (one multi with version
//!   checks, so a parent that gained a child or became a key meanwhile
//!   stays); deleting a key that has children turns it back into a marker.
//!   Markers left by keys the server expired stay until a delete below them
//!   or a `delete_prefix` removes them; they are never keys.
//! * **Versions.** A key's version is its `mzxid`, the zxid of its last
//!   write: store-wide, so never reused after delete and re-create (the
//!   per-znode `version` restarts at 0 and is only used internally for
//!   ZooKeeper's expected-version checks). `create_revision` is `czxid`,
//!   `mod_revision` is `mzxid`.
//! * **Writes.** A plain put is one `setData` (or `create`, with implicit
//!   parents, when the znode is missing): the same round trip as the raw
//!   client. Conditional writes read the znode, evaluate the condition, then
//!   write with the expected znode version (`setData`/`delete` with version,
//!   or a multi of delete + create to change a znode's type); a concurrent
//!   write fails that check and the condition is evaluated again.
//! * **list / keys / delete_prefix** walk the subtree level by level with
//!   multi-reads (one round trip per depth level and 64 znodes); results are
//!   sorted by key and directory-scoped (`a` covers `/ns/a/…` only). Not a
//!   snapshot across levels.
//! * **TTL** keys are persistent-with-TTL znodes (the server needs
//!   `extendedTypesEnabled=true`; otherwise the put is `Error::Unsupported`).
//!   ZooKeeper shows TTL znodes to clients exactly like persistent ones, so
//!   anykv marks them itself: their data is `\0anykv\0t` + the TTL in
//!   milliseconds (8 bytes) + the value — the one case where other clients
//!   see more than the value — and they are created without WRITE
//!   permission, so a plain put learns from its single `setData` (refused)
//!   that it must replace the TTL znode by a persistent one (a put without
//!   TTL makes a key permanent). Reads hide a TTL key as soon as
//!   `now - mtime > ttl` on this machine's clock (the server's own rule);
//!   the server removes the znode at its next container check
//!   (`znode.container.checkIntervalMs`, 60 s by default), which is when
//!   watches see the delete. `Capabilities::ttl` is `ttl_check_interval`
//!   plus one second. A znode with children cannot change type: giving a
//!   TTL to (or taking it from) a key that has children is an
//!   `InvalidArgument`, and the server never expires a TTL znode that has
//!   children.
//! * **Reads.** ZooKeeper answers a read from the server the session is
//!   connected to, which may be behind the leader. What `get`, `exists`,
//!   `list`, `keys`, `export` and `lock_holder` guarantee per
//!   `consistency=`:
//!   - `sequential` (default, ZooKeeper's own guarantee): a read sees every
//!     write this store (its session) made or saw before, and never goes
//!     back in time within a session; it may miss a write another client's
//!     session had acknowledged, until the server catches up. On a single
//!     server nothing lags, so reads are linearizable there. After a
//!     session expiry the new session may land on a server behind the old
//!     one (an ensemble only).
//!   - `linearizable`: a `sync` on the path first (one more round trip to
//!     the leader), so the read reflects every write acknowledged to anyone
//!     before the read started. One caveat is ZooKeeper's: `sync` is not a
//!     quorum operation (ZOOKEEPER-1675), so a leader cut off by a
//!     partition can answer it from stale state until it notices it lost
//!     its quorum (within about `syncLimit` ticks). Writes and conditional
//!     writes need neither: they go through the leader, and their version
//!     checks make a stale read fail the write, which is then evaluated
//!     again.
//!     The `sync` roughly halves read throughput: against one loopback
//!     server here (`benches/raw_vs_anykv.rs`, two runs on a loaded 2-core
//!     VM) a get at concurrency 1 took a p50 of 270–310 µs instead of
//!     140 µs (0.46–0.57× the ops/s), at concurrency 64 0.45–0.52× the
//!     ops/s; the raw client's `sync` + `getData` is as fast (0.88–1.16×).
//! * **Watch**: one task per store (the *hub*), on a ZooKeeper session of
//!   its own (so its reads never queue behind the store's writes), serves
//!   every watch. Server-side it holds persistent watches
//!   (`AddWatchMode::PersistentRecursive` for a prefix, `Persistent` for a
//!   key), shared: a watch under a recursive watch already registered (or
//!   on a key already watched) uses it, and a new recursive watch takes
//!   over the ones below it, so registrations never overlap and one server
//!   watch serves many anykv watches, fanned out locally by path. Once 64
//!   watches have their key or prefix directly under one parent znode,
//!   that parent gets one `PersistentRecursive` watch serving all of them
//!   and any later one below it (a server watch of its own costs the client
//!   about 0.8 KiB and the setup one request); the price is that changes to
//!   unwatched znodes below that parent are notified too, and dropped by
//!   the hub without a read. Each watch is its view of its range and a
//!   bounded queue (no task, channel or timer of its own). Watches started
//!   together are set up together: registrations, one `sync` and the reads
//!   sent back to back, the prefixes of a batch read level by level in
//!   shared multi-reads (one round trip per batch, plus one per level of a
//!   prefix). `cargo xtask bench watch zookeeper` (10,000 watches on one
//!   `anykv::open` handle, 100 opened at a time, each on its own key or
//!   prefix, standalone server, loaded 2-core VM) measured a setup of
//!   0.13–0.63 s (70–230 ms of client CPU; up to 1.7 s of wall time while
//!   the disk was saturated) and 1.5–1.8 KiB of client RSS per watch,
//!   layers and the bench's consumer included. At 500 puts/s the event
//!   followed the put's acknowledgement by 0.2–0.5 ms at p50; at p99 by
//!   1.4–8 ms while the server's own put p99 stayed under 20 ms, and by as
//!   much as the server's write stalls otherwise: the hub must read the
//!   znode after the notification, and a standalone server holds a read
//!   while writes wait for their log sync (its `SyncRequestProcessor`), so
//!   the tail follows the server's write latency. Those reads go out as
//!   soon as notifications arrive (up to four reads in flight).
//!   ZooKeeper 3.8 notifications carry no data and no zxid, so the hub
//!   reads each notified path once for all watches on it (a delete needs
//!   no read) and emits each watch's differences from what it
//!   delivered before, in revision order: a put when every earlier change
//!   is known read (notifications arrive in zxid order before any reply
//!   that reflects them), a delete at a revision at or below its real zxid
//!   and above every earlier event. Changes between two reads of a key
//!   merge (a put and a delete in quick succession can show as the
//!   delete). A disconnection can lose notifications (ZOOKEEPER-4698, and
//!   zookeeper-client 0.11 does not register persistent watches again): a
//!   read across it is dropped, and once connected the hub registers every
//!   server watch anew, `sync`s, re-reads every range and emits the
//!   differences; after a session expiry the same on a new session. So
//!   watches resume by themselves after a server restart or freeze:
//!   `watch_history: Converge`. `Start::After(r)` emits the current keys
//!   whose `mzxid > r` as puts, then live events. A consumer that falls
//!   256 events behind is detached alone (the hub never waits on it); once
//!   it has drained its queue, its range is re-read and the differences
//!   emitted (Converge), then it is delivered to as before. Dropping a
//!   stream frees its share at once; the last user of a server watch
//!   removes it. Liveness is the session's, not per watch.
//! * **snapshot** (`SnapshotMode::Verified`): ZooKeeper has no read of
//!   several znodes at one zxid (its multi-read is one request, not
//!   documented as atomic, and a range needs a read per depth level), so
//!   the driver reads every prefix with stats, then reads the stat of every
//!   znode again (the bases' too, or for a missing base its nearest
//!   existing ancestor's) and accepts only when each `mzxid` and `pzxid`
//!   is unchanged: no write and no child created or deleted in between, so
//!   every pair was current at the instant between the two passes.
//!   `revision` is the largest `mzxid`/`pzxid` seen, and
//!   `watch(Start::After(revision))` reports every later change. Under
//!   writes it tries up to 10 times (backing off 2 ms … 100 ms), then fails
//!   with `Unavailable`. `compact` is unsupported (ZooKeeper keeps no
//!   history to discard).
//! * **Locks** follow the ephemeral-sequential recipe under
//!   `/__anykv/locks/<ns>/<key>`: znode `lock-<guid>-<seq>` (the GUID finds
//!   one's znode again if a create reply was lost), the lowest sequence
//!   holds the lock, each waiter watches only its predecessor. The fencing
//!   token is the holder znode's `czxid` (strictly increasing across
//!   holders, even if the lock directory is removed and re-created). A lock
//!   lives as long as the store's session: `LockOptions::ttl` is not used;
//!   a dead holder's lock frees when its session expires
//!   (`session_timeout`). `lost()` fires when the session expires or the
//!   holder znode is deleted by someone else.
//! * **atomic** is one ZooKeeper multi: checks become `check` ops on the
//!   znode versions read just before (an absence check on a missing znode
//!   becomes create + delete of that path), writes carry expected versions;
//!   if anything changed in between, the multi fails as a whole and the call
//!   is evaluated again. It returns the multi's zxid. The whole multi must
//!   fit ZooKeeper's request limit (`jute.maxbuffer`, 1 MiB).
//! * **Errors**: connection loss, session expiry and unreachable servers are
//!   `Unavailable` (not alive); NoNode / NodeExists / BadVersion are
//!   NotFound / AlreadyExists / Conflict; NoAuth is `PermissionDenied`.
//!   The probe is `sync` + `exists` on the namespace root, bounded by
//!   `timeout`.
//! * **During an outage** zookeeper-client 0.11 keeps the session and
//!   reconnects in the background (backing off 0.1 s, 0.2 s, … per round of
//!   servers, until the session expires). It fails the requests in flight
//!   when a connection drops (`ConnectionLoss`, or an I/O error): those may
//!   have been applied. A request handed to it while disconnected is
//!   **queued** (not refused) and sent once it reconnects — even after the
//!   caller's deadline — or failed with the session's end (`SessionExpired`,
//!   `ClientClosed`) if it never does; it refuses a request outright only
//!   once the session is over. So this driver never hands it a request
//!   while the session is disconnected: the operation fails at once with
//!   `Unavailable` marked *never sent* ([`Error::never_reached_server`]), as
//!   does a failure to open a session. The retry layer retries those, writes
//!   included; a write that failed any other way is not retried (it may
//!   have been applied). A connection dropping between the check and the
//!   send still queues that one request; it is then bounded by `timeout`
//!   like any other.
//! * **Sessions** (`Store::session`, ephemeral keys): each is a ZooKeeper
//!   session of its own — a new client connection asking for the TTL as its
//!   session timeout. The server clamps it to `[minSessionTimeout,
//!   maxSessionTimeout]` (2 to 20 × `tickTime` by default: 4 s to 40 s with
//!   the usual 2 s tick) and `Session::ttl` reports the negotiated timeout;
//!   `Session::id` is the session id in hex, as `cons` shows it. The client
//!   keeps it alive with its own pings (after 3/20 of the timeout idle, and
//!   it drops a connection silent for 2/5 of it and moves to another
//!   server): no renewal task of the driver's. A session put writes an EPHEMERAL
//!   znode of that session through the conditional put above (read, check
//!   the condition, write at the znode version), so values are encoded and
//!   implicit parents created as for any key, and the version is the
//!   `mzxid`. A key that is a znode of another type or owner (a plain key,
//!   another session's key, a TTL key) is replaced in one multi (delete at
//!   its version + create): it moves to this session. A put without
//!   session on a session key makes it permanent (replaced the same way;
//!   `setData` reports the owner, so a plain put costs one more round trip
//!   only then). **An ephemeral znode cannot have children**: a session key
//!   above another key fails with `InvalidArgument` — a put below a session
//!   key (with or without session), or a session put on a key that has keys
//!   below it. `close` (and drop) closes the client: the server deletes
//!   the session's ephemerals as it closes it, before `close` returns
//!   (bounded by `timeout`; a disconnected client cannot tell the server,
//!   and the session then ends with its timeout). `lost()` fires when the
//!   session's state turns `Expired` (the server said so on a reconnect, or
//!   the client gave up on its own after 7/5 of the timeout without a
//!   server), `Closed` or `AuthFailed`; a disconnection alone is not a loss
//!   (on reconnect within the timeout the session and its keys survive —
//!   ZooKeeper's semantics), so on a partitioned client `lost()` fires
//!   after the server has deleted the keys: measured 6.5–6.7 s after a
//!   freeze at TTL 4 s, when the keys went at 3.7–5.7 s. A put on an ended
//!   session fails with `LockLost`; while the session reconnects, with
//!   `Unavailable` marked never sent. Granularity (how long past the TTL a
//!   dead session's keys survive) is declared 3 s: the server's session
//!   tracker expires sessions in `tickTime` buckets (each deadline rounded
//!   up to the next tick) and then commits the deletes; measured at TTL
//!   4 s, tick 2 s: 0–1.65 s past the TTL after a freeze, 2.0 s after a
//!   SIGKILL. It does not grow with the TTL, only with `tickTime`.
//!   Sessions work across processes (any client sees the keys).
//! * **The store's session**: one session per store, opened on first use (bounded by
//!   `timeout`, failing fast when every server refuses, so opening a store
//!   against a dead endpoint never hangs and its liveness reports it),
//!   moved across servers by the client, and opened again after it expires.
//! * **ACLs**: znodes are created `world:anyone` with all permissions, or,
//!   when the URL carries credentials, for the authenticated user only
//!   (`auth`); TTL znodes the same without WRITE. That includes the implicit
//!   parents such a store creates, namespace path included: other users
//!   cannot create below them, so create shared ancestors beforehand (or
//!   use a top-level namespace) when several users share a server.

mod codec;
mod conn;
mod error;
mod lock;
mod session;
mod snapshot;
mod tree;
mod txn;
mod watch;
mod write;

use std::{
    sync::{Arc, LazyLock},
    time::Duration,
};

use anykv_core::{
    Bytes, Capabilities, Check, Condition, Config, Error, Key, KvPair, LockGuard, LockInfo,
    LockOptions, Op, Prefix, PutOptions, Result, Revision, Snapshot, SnapshotMode, Start, Store,
    Target, Version, WatchHistory, WatchStream, async_trait, registry::Driver,
};
use zookeeper_client::{self as zk, CreateMode, CreateOptions};

use crate::{
    codec::Node,
    conn::{Conn, Consistency, Session, Settings},
    error::BACKEND,
    write::Cx,
};

/// Every permission but WRITE: a TTL znode refuses `setData`, which is how
/// a plain put learns in its one round trip that it must replace the znode.
fn no_write() -> zk::Permission {
    zk::Permission::READ | zk::Permission::CREATE | zk::Permission::DELETE | zk::Permission::ADMIN
}

static TTL_ANYONE: LazyLock<[zk::Acl; 1]> =
    LazyLock::new(|| [zk::Acl::new(no_write(), zk::AuthId::anyone())]);
static TTL_CREATOR: LazyLock<[zk::Acl; 1]> =
    LazyLock::new(|| [zk::Acl::new(no_write(), zk::AuthId::authed())]);

/// Largest value accepted: ZooKeeper's default `jute.maxbuffer` is 1 MiB
/// (1,048,575 bytes) for a whole request, path and headers included.
pub const MAX_VALUE_SIZE: usize = 1_000_000;

/// Capabilities for a server whose container check runs every `check_interval`.
pub fn capabilities(check_interval: Duration) -> Capabilities {
    Capabilities::full(MAX_VALUE_SIZE)
        .with_ttl(Some(check_interval + Duration::from_secs(1)))
        .with_watch(WatchHistory::Converge)
        .with_locks(true, true)
        .with_durable(true)
        .with_snapshot(Some(SnapshotMode::Verified))
        .with_sessions(Some(session::SESSION_GRANULARITY), true)
}

inventory::submit! {
    Driver {
        name: "zookeeper",
        schemes: &["zk", "zookeeper"],
        description: "Apache ZooKeeper 3.5+ (znodes, mzxid versions, multi, TTL nodes, persistent watches)",
        params: conn::PARAMS,
        path_is_namespace: true,
        capabilities: || capabilities(conn::DEFAULT_TTL_CHECK_INTERVAL),
        open: |config| Box::pin(async move {
            Ok(Arc::new(ZkStore::open(config).await?) as Arc<dyn Store>)
        }),
    }
}

/// A ZooKeeper-backed [`Store`]. Cheap to clone; clones share the session.
#[derive(Clone)]
pub struct ZkStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ZkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkStore")
            .field("url", &self.inner.conn.settings.redacted)
            .finish()
    }
}

/// State shared by a store, its watches and its locks.
pub(crate) struct Inner {
    pub(crate) conn: Conn,
    caps: Capabilities,
    /// ACL of keys and implicit parents.
    pub(crate) acls: zk::Acls<'static>,
    /// ACL of TTL keys: the same without WRITE (see `write::put_always`).
    ttl_acls: zk::Acls<'static>,
    /// The namespace root znode, probed by `probe()`.
    namespace_path: String,
    /// The task serving the store's watches.
    pub(crate) hub: watch::HubHandle,
    /// Open sessions of ephemeral keys (see `session.rs`).
    pub(crate) ephemeral_sessions: session::Registry,
}

impl Inner {
    pub(crate) async fn session(&self) -> Result<Arc<Session>> {
        self.conn.session().await
    }

    /// Maps a client error; forgets the session if the error says it is gone.
    pub(crate) fn fail(
        &self,
        session: &Arc<Session>,
        e: zk::Error,
        operation: &'static str,
        key: &str,
    ) -> Error {
        if error::session_gone(&e) {
            self.conn.forget(session);
        }
        error::map(e, operation, key)
    }

    /// Before a read: with `consistency=linearizable`, `sync` on the path so
    /// the server catches up with the leader (see the crate docs).
    pub(crate) async fn sync_for_read(
        &self,
        session: &Session,
        path: &str,
    ) -> Result<(), zk::Error> {
        match self.conn.settings.consistency {
            Consistency::Sequential => Ok(()),
            Consistency::Linearizable => session.client.sync(path).await,
        }
    }

    /// Options of a key's znode.
    pub(crate) fn node_options(&self) -> CreateOptions<'static> {
        CreateMode::Persistent.with_acls(self.acls)
    }

    /// Options of a key's znode with a TTL.
    pub(crate) fn ttl_options(&self, ttl: Duration) -> CreateOptions<'static> {
        CreateMode::Persistent
            .with_acls(self.ttl_acls)
            .with_ttl(ttl)
    }

    /// Options of an implicit parent.
    pub(crate) fn dir_options(&self) -> CreateOptions<'static> {
        tree::dir_options(self.acls)
    }

    /// Options of a session key's znode.
    pub(crate) fn ephemeral_options(&self) -> CreateOptions<'static> {
        CreateMode::Ephemeral.with_acls(self.acls)
    }

    /// Options of a lock's ephemeral-sequential znode.
    pub(crate) fn lock_options(&self) -> CreateOptions<'static> {
        CreateMode::EphemeralSequential.with_acls(self.acls)
    }
}

impl ZkStore {
    /// Builds a store from a parsed URL (see the crate docs for the options).
    /// Does not connect: the session opens on first use, so a store can be
    /// made while ZooKeeper is down and its liveness reports it.
    pub async fn open(config: Config) -> Result<ZkStore> {
        let settings = Settings::from_config(&config)?;
        let (acls, ttl_acls) = if settings.digest.is_some() {
            (zk::Acls::creator_all(), zk::Acls::new(&*TTL_CREATOR))
        } else {
            (zk::Acls::anyone_all(), zk::Acls::new(&*TTL_ANYONE))
        };
        let caps = capabilities(settings.ttl_check_interval);
        Ok(ZkStore {
            inner: Arc::new(Inner {
                conn: Conn::new(settings),
                caps,
                acls,
                ttl_acls,
                namespace_path: codec::prefix_path(config.namespace.as_str()),
                hub: watch::HubHandle::default(),
                ephemeral_sessions: Default::default(),
            }),
        })
    }

    /// Id of the current ZooKeeper session (0 before the first operation),
    /// as the server shows it in the `cons` four-letter command.
    pub fn session_id(&self) -> i64 {
        self.inner.conn.session_id()
    }

    /// The current session's id and password, for tests that expire it by
    /// taking it over with another client and closing that one.
    #[doc(hidden)]
    pub fn session_info(&self) -> Option<zk::SessionInfo> {
        self.inner.conn.session_info()
    }

    /// The id and password of an open [`Store::session`] by its id, for
    /// tests that expire it from outside (taking it over with another
    /// client and closing that one).
    #[doc(hidden)]
    pub fn session_info_of(&self, id: &str) -> Option<zk::SessionInfo> {
        self.inner
            .ephemeral_sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    fn cx<'a>(
        &'a self,
        session: &'a Arc<Session>,
        operation: &'static str,
        key: &'a str,
    ) -> Cx<'a> {
        Cx {
            inner: &self.inner,
            session,
            operation,
            key,
        }
    }
}

/// The error for a key inside ZooKeeper's own `/zookeeper` subtree.
fn reserved(key: &Key) -> Error {
    Error::InvalidArgument {
        backend: BACKEND,
        message: format!("{key}: /zookeeper is ZooKeeper's own subtree"),
    }
}

#[async_trait]
impl Store for ZkStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    async fn get(&self, key: &Key) -> Result<Option<KvPair>> {
        let path = codec::path_of(key.as_str());
        if codec::is_system(&path) {
            return Ok(None);
        }
        let s = self.inner.session().await?;
        let read = async {
            self.inner.sync_for_read(&s, &path).await?;
            s.client.get_data(&path).await
        };
        match read.await {
            Ok((data, stat)) => Ok(match codec::classify(data, &stat, codec::now_millis()) {
                Node::Key(value) => Some(codec::pair(key.clone(), value, &stat)),
                Node::NotKey => None,
            }),
            Err(zk::Error::NoNode) => Ok(None),
            Err(e) => Err(self.inner.fail(&s, e, "get", key.as_str())),
        }
    }

    async fn put(&self, key: &Key, value: Bytes, opts: PutOptions) -> Result<Version> {
        let path = codec::path_of(key.as_str());
        if codec::is_system(&path) {
            return Err(reserved(key));
        }
        // ZooKeeper counts TTLs in whole milliseconds (and refuses 0).
        let ttl = opts.ttl.map(|t| t.max(Duration::from_millis(1)));
        let data = codec::encode(&value, ttl);
        let s = self.inner.session().await?;
        let cx = self.cx(&s, "put", key.as_str());
        match (opts.condition, ttl) {
            (Condition::Always, None) => write::put_always(&cx, &path, &data).await,
            (cond, ttl) => {
                let kind = ttl.map_or(write::Kind::Persistent, write::Kind::Ttl);
                write::put_checked(&cx, key, &path, &data, cond, kind)
                    .await
                    // A server without `extendedTypesEnabled=true` refuses TTL
                    // znodes as unimplemented.
                    .map_err(|e| match e {
                        Error::Unsupported { backend, .. } if ttl.is_some() => Error::Unsupported {
                            backend,
                            operation: "ttl",
                        },
                        e => e,
                    })
            }
        }
    }

    async fn delete(&self, key: &Key, condition: Condition) -> Result<bool> {
        let path = codec::path_of(key.as_str());
        if codec::is_system(&path) {
            return write_nothing(key, condition);
        }
        let s = self.inner.session().await?;
        let cx = self.cx(&s, "delete", key.as_str());
        write::delete(&cx, key, &path, condition).await
    }

    async fn list(&self, prefix: &Prefix) -> Result<Vec<KvPair>> {
        let base = codec::prefix_path(prefix.as_str());
        let s = self.inner.session().await?;
        let read = async {
            self.inner.sync_for_read(&s, &base).await?;
            tree::scan(&s.client, &base).await
        };
        let nodes = read
            .await
            .map_err(|e| self.inner.fail(&s, e, "list", prefix.as_str()))?;
        let now = codec::now_millis();
        let mut pairs: Vec<KvPair> = nodes
            .into_iter()
            .filter_map(|n| {
                let key = codec::key_of(&n.path)?;
                match codec::classify(n.data, &n.stat, now) {
                    Node::Key(value) => Some(codec::pair(key, value, &n.stat)),
                    Node::NotKey => None,
                }
            })
            .collect();
        pairs.sort_by(|a, b| a.key.as_str().as_bytes().cmp(b.key.as_str().as_bytes()));
        Ok(pairs)
    }

    async fn delete_prefix(&self, prefix: &Prefix) -> Result<u64> {
        let base = codec::prefix_path(prefix.as_str());
        let s = self.inner.session().await?;
        let n = tree::delete_below(&s.client, &base)
            .await
            .map_err(|e| self.inner.fail(&s, e, "delete_prefix", prefix.as_str()))?;
        if !prefix.is_root() {
            tree::prune_self(&s.client, &base).await;
        }
        Ok(n)
    }

    async fn watch(&self, target: Target, start: Start) -> Result<WatchStream> {
        watch::watch(self.inner.clone(), target, start).await
    }

    async fn snapshot(&self, prefixes: &[Prefix]) -> Result<Snapshot> {
        snapshot::snapshot(&self.inner, prefixes).await
    }

    async fn lock(&self, key: &Key, opts: LockOptions) -> Result<LockGuard> {
        // Waiting ends with Ok(Some) or an error (Timeout after `opts.wait`).
        lock::acquire(&self.inner, key, &opts, opts.wait, false)
            .await?
            .ok_or_else(|| write::contention(key.as_str()))
    }

    async fn try_lock(&self, key: &Key, opts: LockOptions) -> Result<Option<LockGuard>> {
        lock::acquire(&self.inner, key, &opts, None, true).await
    }

    async fn lock_holder(&self, key: &Key) -> Result<Option<LockInfo>> {
        lock::holder(&self.inner, key).await
    }

    async fn session(&self, opts: anykv_core::SessionOptions) -> Result<anykv_core::Session> {
        session::start(&self.inner, opts).await
    }

    async fn atomic(&self, checks: Vec<Check>, ops: Vec<Op>) -> Result<Revision> {
        txn::atomic(&self.inner, checks, ops).await
    }

    async fn probe(&self) -> Result<()> {
        let s = self.inner.session().await?;
        let path = &self.inner.namespace_path;
        let probe = async {
            s.client.sync(path).await?;
            s.client.check_stat(path).await.map(|_| ())
        };
        match tokio::time::timeout(self.inner.conn.settings.connect_timeout, probe).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.inner.fail(&s, e, "probe", path)),
            Err(_) => Err(Error::Timeout {
                backend: BACKEND,
                operation: "probe",
                after: self.inner.conn.settings.connect_timeout,
            }),
        }
    }

    async fn close(&self) -> Result<()> {
        self.inner.conn.close();
        Ok(())
    }
}

/// `delete` of a key inside `/zookeeper`: it is never a key.
fn write_nothing(key: &Key, condition: Condition) -> Result<bool> {
    anykv_core::store::condition::check(BACKEND, key, condition, None)?;
    Ok(false)
}
