//! Consul KV driver for anykv.
//!
//! ```text
//! consul://host:port/prefix?token=…&dc=…&consistency=consistent|default|stale&timeout=5s
//! consuls://host:port/prefix?…&ca_file=/path/ca.pem        (HTTPS)
//! consul://host1:port,host2:port,host3:port/prefix         (several agents)
//! ```
//!
//! Options: `token` (ACL token, sent as `X-Consul-Token`, never shown in
//! `Debug`, `Display`, logs or errors), `dc` (datacenter), `consistency`
//! (mode of reads, `consistent` unless set: see [Reads](#reads)), `lock_delay` (see Locks,
//! default `0s`), `ca_file` (a PEM CA trusted besides the webpki roots, for
//! `consuls://`; read when the store is opened), `max_conns` and
//! `max_watch_conns` (connections of the handle, default 32 and 16 of them
//! for watches: see Connections) and the common options
//! (`timeout`, `retries`, …). An untrusted server certificate fails like
//! an unreachable agent (`Unavailable`). The driver talks to one agent at a
//! time (`host:port`, default port 8500, 8501 for `consuls`), which
//! forwards to the servers. With several agents in the URL (e.g. the
//! servers of a cluster, or a local agent and a fallback), requests go to
//! the first and move to the next when it fails to answer (no connection,
//! no answer within the deadline, 5xx/429); a blocking query waiting on an
//! agent that others found dead is sent again to the next. Lock sessions
//! belong to the node of the agent that created them (their `serfHealth`
//! check): if that agent's node fails, Consul invalidates them and the
//! guard reports `lost()`.
//!
//! The driver is built on consulrs 0.1.0's request and response types,
//! executed on one `reqwest` client; `/v1/txn` and `/v1/status/leader`, which
//! consulrs lacks, go through that same client. consulrs' own helpers are not
//! used: they percent-encode key paths twice (a key `ü` or `a b` reaches
//! Consul as `%C3%BC`, `a%20b`), `unwrap()` the token into a header, drop
//! the `X-Consul-Index` of 404 answers (which blocking queries on absent
//! keys need), and `kv::set` takes only `&'static` values.
//!
//! # How the contract maps onto Consul
//!
//! - **Version** = the key's `ModifyIndex` (Consul's Raft index of the last
//!   write). It changes on every write and a re-created key gets a new,
//!   larger index, so versions are never reused. `create_revision` =
//!   `CreateIndex`, `mod_revision` = `ModifyIndex`.
//! - **Writes** go through `/v1/txn`, because Consul's plain `PUT` answers
//!   only `true`/`false` and `put` must return the new version: `set` (plain),
//!   `check-not-exists` + `set` (create-only), `get` + `set` (update-only),
//!   `check-index` + `set` (compare-and-swap). Deletes are `get` + `delete`
//!   (whether the key existed) and `check-index` + `delete` (compare-and-delete).
//!   A failed condition is classified with a `consistent` read, so errors
//!   are `AlreadyExists`, `NotFound` or `Conflict { actual }` as everywhere.
//!   Every write puts a random write nonce in the entry's `Flags`: Consul
//!   skips a write identical to the stored entry without bumping
//!   `ModifyIndex`, and the contract wants every write to change the version.
//!   (`Flags` is therefore anykv's; other tools ignore it.)
//! - **Values** up to [`MAX_VALUE_SIZE`] (512 KiB, Consul's `kv_max_value_size`);
//!   larger values are refused before any call. `/v1/txn` carries values
//!   base64-encoded in a body limited to 512 KiB, so values too big for a
//!   transaction (over ≈ 380 KiB) are written with a plain `PUT` (`?cas=`
//!   for conditions, `?acquire=` for TTLs) and their version read back with
//!   a `consistent` read, recognised by the write nonce; if another writer
//!   overwrote such a value in between, `put` returns a version that matches
//!   no write (so a later CAS on it fails) instead of the other writer's.
//!   Conditions on such values are checked by a read before the `PUT`; only
//!   the plain case (`?cas=`) is atomic with the check. Inside `atomic`, values
//!   share the transaction's 512 KiB body: a bigger transaction is
//!   `InvalidArgument`.
//! - **list** reads `prefix/` with `?recurse` (directory semantics: never
//!   `prefixx`); **keys** uses `?keys&separator=/`; **delete_prefix** is one
//!   transaction `get-tree` + `delete-tree` on `prefix/` (so the count is
//!   exact).
//! - **TTL** = a session with `TTL`, `Behavior=delete`, `LockDelay=0s` and no
//!   health checks, which acquires the key (`lock` verb): when the session
//!   expires, Consul deletes the key. Consul's session TTLs are 10 s to 24 h
//!   and a session is invalidated 2 × TTL after its last renewal, so the
//!   driver gives a key with TTL `t` a session of `max(10 s, t/2)`: the key
//!   disappears after `max(20 s, t)` (plus timer slack, and up to one more
//!   2 × TTL after a leader change). Hence the declared granularity of
//!   [`TTL_GRANULARITY`] = 20 s. TTLs above 48 h are `InvalidArgument`.
//!   Re-putting a key with a TTL moves it to a new session in one transaction
//!   (`unlock` old + `lock` new); a put without TTL detaches the key from its
//!   session (`unlock`), so it stays. Sessions of deleted or overwritten keys
//!   are destroyed in the background.
//! - **Watch** = blocking queries (`?index=&wait=`, in the `consistency`
//!   mode), shared: one handle runs at most `max_watch_conns` (default 16)
//!   of them, whatever the number of watches. A *planner* maps the watched
//!   targets onto query scopes: each key alone (a key read) and each prefix
//!   alone (`prefix/?recurse`) while they fit; beyond, it groups them by the
//!   longest common prefix of their paths (`?recurse` on a string prefix:
//!   `app/g1` covers `app/g1/…` and `app/g10/…`), splitting the busiest
//!   scope first (see `watch.rs`), so 2,000 watches on one handle cost 16
//!   queries. A new watch joins a running query that covers it, or gets one
//!   of its own while the bound allows; only when neither is possible does
//!   it re-plan (O(watches), rare: the new plan's scopes cover most of the
//!   watches that follow). When a watch closes, a query nobody needs ends
//!   at once (its connection with it); watches move to the scopes of a new
//!   plan without a gap (each stream keeps its state; every hub's index is
//!   a Raft index). Consul 1.8 does not end a blocking query whose client
//!   went away (the agent holds it, and counts its connection against
//!   `http_max_conns_per_client`, until its wait runs out), so a query
//!   started while more watches than the bound are open (when plans
//!   change) waits 250 ms after its first read before it blocks: the
//!   queries a burst of new watches makes and retires at once leave
//!   nothing behind on the agent.
//!   Each answer is *fanned out* by key: the hub indexes its streams by
//!   key and by directory, and hands what an answer changed only to the
//!   streams whose target a changed key is in; each compares the entries
//!   of its own target with what it last delivered, by `ModifyIndex`. So
//!   a write wakes the watches it concerns, not every watch of the query,
//!   and a key that does not exist yet costs nothing more than the shared
//!   query (Consul answers a query on an absent key or an empty directory
//!   with the index of the whole KV table, so every KV write wakes such a
//!   query: one request per query, no stream woken). A query whose scope
//!   was empty in its last two answers waits 10 ms before it asks again,
//!   so under a stream of other writes it costs the agent at most about a
//!   hundred requests a second, not one per write; a key created there
//!   then reaches its watches up to 10 ms later. Once every query of a
//!   handle found its scope empty that way, they merge into one on the
//!   common prefix of all its watches (about a hundred requests a second
//!   for all of them), split again when that query finds a key; merges are
//!   at least 12 s apart, and never again into a prefix that held keys no
//!   watch covers from its first answer on. The price of sharing:
//!   a scope's
//!   query returns every pair under it on each change (a wide scope under
//!   heavy writes moves more bytes; only changed values are decoded), and
//!   writes landing while a shared query is re-sent (one round trip) are
//!   seen as their result. A handle's *own* puts are never collapsed that
//!   way for its watches: the hub knows their entries and replays the
//!   state they made (in revision order) when its answer already shows a
//!   later one. Writes of other clients follow Converge as before: if
//!   several land between two answers, only the resulting state is seen.
//!   Each stream's mailbox at its hub keeps up to 1,024 answers routed to
//!   it, as the changes each made (shared with the other streams they
//!   went to, so the window costs the size of the changes, not of the
//!   scope); a stream that is not read overflows it alone (the query
//!   never waits for it, memory stays bounded) and, when read again,
//!   re-syncs to the latest answer and emits the differences (Converge),
//!   never an error. Measured (debug build, one handle, agent with default
//!   limits): 2,000 key watches, half on absent keys, 4,000 puts from the
//!   same handle: all delivered, no error, at most 32 sockets to the agent,
//!   last-put delivery p50 ≈ 0.1 s, p99 0.4–1.5 s; a watch read beside one
//!   that is never read: p50 < 1 ms, max < 30 ms.
//!   The hub keeps the index of its last answer
//!   across failures; an answer with a lower index is believed only from a
//!   `consistent` read: a server just restarted answers from its log replay
//!   for a moment (partial states with lower indexes), and a lagging server
//!   in `stale` mode is behind, so such an answer is replaced by a
//!   `consistent` re-read. A lower index on a `consistent` read is a real
//!   reset (tombstone reaping, snapshot restore, lost data): it becomes a
//!   fresh baseline that streams diff against; deletes it reveals carry the
//!   stream's last index, so revisions never go down. So a delete is only
//!   emitted when a state at least as new as the last one shows the key
//!   gone, and a put only when a key's `ModifyIndex` differs from the one
//!   the stream last delivered: across a `kill -9` + restart no event is
//!   invented, duplicated or reordered. Each stream starts from a
//!   `consistent` read of its target that began after `watch` was called
//!   and ended before it returns; watches opened at once under one query
//!   share such reads (one in flight per query's scope; those that ask
//!   meanwhile share the next, which reads the whole scope). Consul
//!   keeps no event history, so
//!   `watch_history` is [`Converge`](WatchHistory::Converge):
//!   `Start::After(r)` first emits the keys in range whose
//!   `ModifyIndex > r` as puts (deletes before the watch started are not
//!   replayed), then live events. A delete carries the `X-Consul-Index` of
//!   the answer that showed it. After a lost connection the query retries
//!   with backoff (at most 2 s apart), each of its streams yields one
//!   `Unavailable` item, and converges by itself when the agent is back
//!   (restarted, or thawed after a freeze); no query outlives its wait
//!   (10 s, plus Consul's jitter of up to 1/16) plus the timeout; a
//!   query that reached a restarted agent without failing first learns of
//!   the reset when that wait runs out.
//!   `close()` ends every watch with `Cancelled`.
//! - **Connections**: at most `max_conns` (default 32) requests of one
//!   handle are in flight at once, hence as many pooled connections: up to
//!   `max_watch_conns` (default 16) for the watch queries, the rest for
//!   everything else (gets, puts, transactions, sessions, watch
//!   baselines), so watches never starve operations nor the reverse; a
//!   request that waits for a connection longer than its deadline fails
//!   with `Timeout`. Consul's default `limits.http_max_conns_per_client`
//!   is 200 per client address: several handles (processes) on one host
//!   share it. A lock waiting or held adds one connection for its blocking
//!   query on the record (outside both shares, so that locks and
//!   operations never wait on each other); session renewals (every third
//!   of a TTL, a few milliseconds each) also go outside both shares.
//! - **Snapshot** = one `/v1/txn`: a `set` of a marker key
//!   (`__anykv/snapshots/<first segment>`, with a fresh nonce) followed by
//!   one `get-tree` per prefix. A read-only transaction would honour
//!   `?consistent`/`?stale` but returns no index at all (no
//!   `X-Consul-Index`, none in the body; checked on 1.8.7), so the marker
//!   makes Consul apply the whole transaction at one Raft index — the
//!   marker's `ModifyIndex`, returned as `Snapshot::revision` — and the
//!   pairs are exactly the state at it ([`SnapshotMode::Atomic`]); every
//!   later write has a higher index, so `watch(.., Start::After(revision))`
//!   reports it. Each snapshot is therefore a Raft write through the
//!   leader, whatever `consistency=` says, and needs write access to the
//!   marker key. At most [`MAX_SNAPSHOT_PREFIXES`] prefixes (Consul's 64
//!   operations, one for the marker): more is `InvalidArgument` (several
//!   transactions would not be one index). `compact` is unsupported:
//!   Consul keeps no history.
//! - **Locks** = a session (`TTL = max(10 s, ttl/2)`, `Behavior=delete`,
//!   `serfHealth` check, lock-delay from `?lock_delay=`) acquiring the lock
//!   record `__anykv/locks/<namespace>/<key>` with the `lock` verb of
//!   `/v1/txn`. The **fencing token** is the record's `ModifyIndex` at
//!   acquisition (a Raft index, so strictly increasing across holders). The
//!   guard renews the session every third of its TTL (sooner, with backoff,
//!   after a failed renewal) and follows the record with `consistent`
//!   blocking queries. `lost()` fires only when the lock is really or
//!   possibly lost: the record no longer names the session on a
//!   `consistent` read, or no renewal succeeded for one session TTL (before
//!   Consul can give the lock to anyone else, which takes 2 × TTL). A renewal
//!   answered "session not found" is not believed alone: a server just
//!   restarted answers that while it replays its log, for a live session;
//!   only a `consistent` read of the record that no longer names the
//!   session confirms it. Transient errors during a restart or freeze
//!   shorter than the session TTL never fire `lost()`.
//!   Release deletes the record if still held (`check-session` + `delete`)
//!   and destroys the session. It runs in a background task that retries a
//!   failed attempt (agent down, frozen, restarting) with backoff (0.1 s
//!   doubling to 2 s) for up to 2 × the session TTL, when Consul would
//!   have expired the session anyway, so another contender gets the lock
//!   soon after the agent is back rather than when the session expires.
//!   `release()` returns the outcome of the first attempt within the
//!   timeout: an error (or `Timeout`) from `release()` means the release
//!   is still being retried in the background, not that the lock stays
//!   held. Dropping the guard starts the same task. Waiting uses
//!   `consistent` blocking queries on the record. `lock_holder` reads the
//!   record's `Session` field (in the `consistency` mode); the owner name
//!   is the record's value.
//!   **Lock-delay** defaults to `0s`, unlike Consul's 15 s: Consul's delay
//!   protects holders that cannot tell they lost a lock; anykv holders get
//!   `lost()` and a fencing token instead, and a 15 s pause after every crash
//!   would make `lock` slow for everyone. Set `?lock_delay=15s` to get
//!   Consul's behaviour back (a lock then cannot be re-taken for that long
//!   after its session is invalidated — not after a normal release).
//! - **Sessions** (`Store::session`) = a Consul session named
//!   `anykv-session` with `TTL` = the session's TTL in whole seconds
//!   (rounded up, at least Consul's 10 s, at most its 24 h: longer is
//!   `InvalidArgument`; `Session::ttl()` reports the TTL used),
//!   `Behavior=delete`, `LockDelay=0s` (a dead leader's election key can be
//!   taken again at once) and no health checks (only the TTL and `close`
//!   end it). **Ephemeral keys** are keys the session acquires:
//!   `Session::put` is one `/v1/txn` `[condition…, lock]` (the conditions
//!   as for `put`, so `AlreadyExists` / `NotFound` / `Conflict` are exact),
//!   and the version is the `lock`'s `ModifyIndex`, as for every write. A
//!   key held by another session (a TTL key, another session's key) moves
//!   to this one in one transaction (`unlock` + `lock`). Values too big for
//!   a transaction use `PUT ?acquire=` as above. A put on an ended session
//!   is `LockLost`: a `lock` refused on a free key is checked with a
//!   `consistent` read of the session. The session is renewed in the
//!   background by the lock code's loop (every third of the TTL, sooner
//!   with backoff after a failure); `lost()` fires when the session is
//!   closed, when a renewal answered "unknown session" *and* a
//!   `consistent` read of the session finds nothing (destroyed or expired;
//!   a restarted server replaying its log says "unknown" for a live
//!   session), or when no renewal succeeded for a whole TTL (Consul deletes
//!   the keys only after 2 × TTL, so the holder hears first: the verdict
//!   comes at the first failed attempt past the TTL, at most the timeout
//!   plus 2 s later — before 2 × TTL while the timeout is under 8 s at the
//!   10 s minimum; the session is then destroyed as soon as the agent
//!   answers). Transient
//!   errors shorter than the TTL never fire it. `close` (and drop) fire
//!   `lost()` and `PUT /v1/session/destroy/<id>`, which deletes the keys; a
//!   failed destroy is retried in the background for up to 2 × TTL. A
//!   process that dies leaves its keys to Consul: gone between TTL and
//!   2 × TTL after its last renewal, hence [`SESSION_GRANULARITY`] = 10 s
//!   at the minimum TTL, `t` at a TTL of `t`. Renewals (of sessions, locks
//!   and TTL keys) and the reads confirming a session is gone use their
//!   own connections, outside `max_conns`' shares (see Connections), so
//!   busy operations or watches never make a session expire. Measured
//!   (debug build, TTL 10 s, one local agent): `lost()` 2.9 s after an
//!   outside `session/destroy` (the next renewal), 12.4 s after the
//!   client was cut off (`timeout=1s`; its key gone 0.1 s after the path
//!   healed); across processes
//!   (`tests/tests/coordination_faults.rs`) leader failover 19.7 s after
//!   `kill -9` of the leader, 16.8 s after `SIGSTOP`, 4 ms from `resign()`
//!   to the next leader, ephemeral key gone 20.1 s after `kill -9`: Consul
//!   expires a session 2 × TTL after its last renewal.
//! - **atomic** = one `/v1/txn`: `get` (exists), `check-not-exists` (absent),
//!   `check-index` (version), and for a value check a `consistent` read whose
//!   `ModifyIndex` becomes a `check-index`; writes are `set` and `delete`. At
//!   most 64 operations (Consul's limit), declared as `max_atomic_ops`. The
//!   revision returned is the commit's index (for a transaction that only
//!   deletes, the KV index read right after it).
//! - **Errors**: 5xx/429 and I/O errors → `Unavailable`, deadlines →
//!   `Timeout` (both flip liveness to not-alive; every request carries a
//!   deadline — the timeout, or a blocking query's wait plus slack — so
//!   background work such as lock renewal never hangs on a frozen agent); 403 →
//!   `PermissionDenied` (`Unauthenticated` for an unknown token); 404 on a
//!   read → absent. A request that could not even connect (refused,
//!   connect timeout) is `Unavailable` marked
//!   [`never_reached_server`](anykv_core::Error::never_reached_server): only
//!   then does the retry layer send a write again, since a write that
//!   timed out or lost its connection after sending may have been applied.
//!   See the `error` module's table.
//! - **probe** = `GET /v1/status/leader` within the timeout; an empty leader
//!   is `Unavailable`.
//!
//! # Reads
//!
//! `consistency=` sets the mode of the reads a user asks for (`get`,
//! `exists`, `list`, `keys`, `export`, `lock_holder`) and of a watch's
//! blocking queries:
//!
//! | mode | guarantee | risk |
//! |---|---|---|
//! | `consistent` (default) | never misses an acknowledged write: the leader confirms with a quorum that it still leads and has applied its whole log | one more round trip to a quorum per read; no answer without a leader |
//! | `default` | Consul's default: the leader answers from its state | for a moment after a server restart or leader election the state is still replaying its log: acknowledged keys read as absent (seen here for 10–260 ms after a `kill -9` + restart); a deposed leader may answer stale data in a partition |
//! | `stale` | any server answers, even without a leader | as `default`, plus a follower's lag (unbounded while it is cut off) |
//!
//! Reads that feed a decision — classifying a failed condition, the lock's
//! state, a watch's baseline and the re-read that confirms a watch's index
//! reset, `atomic`'s value checks — are always `consistent`. A watch never
//! invents events in any mode (see Watch); in the weaker modes it may only
//! see a change later.
//!
//! ```no_run
//! # async fn demo() -> anykv_core::Result<()> {
//! use anykv_consul as _; // link the driver
//! use anykv_core::StoreExt;
//! let kv = anykv_core::open("consul://127.0.0.1:8500/app?timeout=2s").await?;
//! kv.set("feature/x", "on").await?;
//! # Ok(()) }
//! ```

mod agents;
mod ephemeral;
mod error;
mod http;
mod kv;
mod lock;
mod session;
mod settings;
mod snapshot;
mod txn;
mod watch;

use std::{fmt, sync::Arc, time::Duration};

use anykv_core::{
    Capabilities, Check, Condition, Config, Key, KvPair, LockGuard, LockInfo, LockOptions, Op,
    Prefix, PutOptions, Result, Revision, Session, SessionOptions, Snapshot, SnapshotMode, Start,
    Store, Target, Version, WatchHistory, WatchStream, async_trait, registry::Driver,
};
use bytes::Bytes;

use crate::{error::BACKEND, http::Transport, settings::Settings};

/// Largest value accepted: Consul's default `kv_max_value_size` (512 KiB).
pub const MAX_VALUE_SIZE: usize = 512 * 1024;

/// How late a key with a TTL may disappear: Consul's shortest session TTL
/// (10 s) doubled, as Consul invalidates a session 2 × TTL after its last
/// renewal. Keys with TTLs of 20 s or more disappear within about a second
/// of their TTL.
pub const TTL_GRANULARITY: Duration = Duration::from_secs(20);

/// How long past its TTL a dead session's keys may survive, at Consul's
/// shortest session TTL (10 s): Consul deletes them 2 × TTL after the last
/// renewal (its documented bound; in practice exactly then). It grows with
/// the TTL: a session of TTL `t` loses its keys between `t` and `2t` after
/// its last renewal. See Sessions in the crate docs.
pub const SESSION_GRANULARITY: Duration = Duration::from_secs(10);

/// Most checks + writes in one `atomic` call: Consul's `/v1/txn` limit.
pub const MAX_ATOMIC_OPS: usize = 64;

/// Most prefixes in one `snapshot`: one transaction's operations, minus the
/// index marker (see Snapshot in the crate docs).
pub const MAX_SNAPSHOT_PREFIXES: usize = MAX_ATOMIC_OPS - 1;

const CAPS: Capabilities = Capabilities::full(MAX_VALUE_SIZE)
    .with_ttl(Some(TTL_GRANULARITY))
    .with_watch(WatchHistory::Converge)
    .with_locks(true, true)
    .with_sessions(Some(SESSION_GRANULARITY), true)
    .with_max_atomic_ops(Some(MAX_ATOMIC_OPS))
    .with_snapshot(Some(SnapshotMode::Atomic))
    .with_durable(true);

anykv_core::inventory::submit! {
    Driver {
        name: "consul",
        schemes: &["consul", "consuls"],
        description: "Consul KV (consul://host:8500/prefix?token=…; consuls:// for TLS)",
        params: settings::PARAMS,
        path_is_namespace: true,
        capabilities: || CAPS,
        open: |config| Box::pin(async move {
            Ok(ConsulStore::connect(&config)? as Arc<dyn Store>)
        }),
    }
}

/// A Consul KV store (one HTTP client to the agents of its URL).
///
/// Usually opened through `anykv_core::open("consul://…")`, which adds the
/// standard layers; [`ConsulStore::connect`] gives the bare driver.
pub struct ConsulStore {
    inner: Arc<Inner>,
}

/// What the store's background tasks share with it.
pub(crate) struct Inner {
    pub(crate) http: Arc<Transport>,
    pub(crate) watches: watch::Registry,
}

impl fmt::Debug for ConsulStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.inner.http.settings();
        f.debug_struct("ConsulStore")
            .field("agents", &s.agents)
            .field("token", &s.token.as_ref().map(|_| "***"))
            .field("dc", &s.dc)
            .finish_non_exhaustive()
    }
}

impl ConsulStore {
    /// Builds the driver from a parsed URL. No network I/O happens here:
    /// Consul's HTTP API needs no session, so the first operation (or
    /// `probe`) is the first contact.
    pub fn connect(config: &Config) -> Result<Arc<ConsulStore>> {
        let settings = Settings::from_config(config)?;
        let watch_conns = settings.max_watch_conns;
        let http = Arc::new(Transport::new(settings)?);
        Ok(Arc::new(ConsulStore {
            inner: Arc::new(Inner {
                http,
                watches: watch::Registry::new(watch_conns),
            }),
        }))
    }

    /// How many blocking-query loops run now: at most `max_watch_conns`,
    /// however many streams watch (see Watch in the crate docs); a loop
    /// ends (and its query with it) when no watch needs its scope.
    pub fn watch_loops(&self) -> usize {
        self.inner.watches.len()
    }
}

#[async_trait]
impl Store for ConsulStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> &Capabilities {
        &CAPS
    }

    async fn get(&self, key: &Key) -> Result<Option<KvPair>> {
        self.inner.get(key).await
    }

    async fn put(&self, key: &Key, value: Bytes, opts: PutOptions) -> Result<Version> {
        self.inner.put(key, value, opts).await
    }

    async fn delete(&self, key: &Key, condition: Condition) -> Result<bool> {
        self.inner.delete(key, condition).await
    }

    async fn list(&self, prefix: &Prefix) -> Result<Vec<KvPair>> {
        self.inner.list(prefix).await
    }

    async fn keys(&self, prefix: &Prefix) -> Result<Vec<String>> {
        self.inner.keys(prefix).await
    }

    async fn delete_prefix(&self, prefix: &Prefix) -> Result<u64> {
        self.inner.delete_prefix(prefix).await
    }

    async fn watch(&self, target: Target, start: Start) -> Result<WatchStream> {
        watch::watch(&self.inner, target, start).await
    }

    async fn lock(&self, key: &Key, opts: LockOptions) -> Result<LockGuard> {
        lock::lock(&self.inner, key, opts).await
    }

    async fn try_lock(&self, key: &Key, opts: LockOptions) -> Result<Option<LockGuard>> {
        lock::try_lock(&self.inner, key, opts).await
    }

    async fn lock_holder(&self, key: &Key) -> Result<Option<LockInfo>> {
        lock::holder(&self.inner, key).await
    }

    async fn session(&self, opts: SessionOptions) -> Result<Session> {
        ephemeral::start(&self.inner, opts).await
    }

    async fn atomic(&self, checks: Vec<Check>, ops: Vec<Op>) -> Result<Revision> {
        self.inner.atomic(checks, ops).await
    }

    async fn snapshot(&self, prefixes: &[Prefix]) -> Result<Snapshot> {
        self.inner.snapshot(prefixes).await
    }

    async fn probe(&self) -> Result<()> {
        self.inner.probe().await
    }

    /// Ends every watch of this store with `Cancelled`. The store itself
    /// stays usable (its HTTP connections are pooled and freed on drop);
    /// held locks keep their sessions until released.
    async fn close(&self) -> Result<()> {
        self.inner.watches.close();
        Ok(())
    }
}
