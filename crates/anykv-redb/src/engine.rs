//! One open redb file: the database, its writer thread, the live event
//! channel and the lock table, shared by every store handle on that file in
//! this process.
//!
//! redb lets one process open a file at a time (a second open is
//! `DatabaseAlreadyOpen`). Within a process, several `redb://same.redb` URLs
//! (different `?prefix=` namespaces, say) share one engine instead of
//! failing, so they also share locks and watches as they would on a server.
//! Another process gets `Error::Unavailable` saying the file is in use.

use std::{
    collections::HashMap,
    ops::Bound,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anykv_core::{Error, Event, Key, KvPair, Prefix, Result, Revision};
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use crate::{
    codec,
    error::{self, BACKEND, Failure},
    hub::Hub,
    lock::LockTable,
    writer::{Cmd, WriteOp, WriteReq, Writer, WriterSettings, now_ms},
};

/// Key → record (see [`codec::encode_record`]).
pub(crate) const KV: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("anykv_kv");
/// (expiry in Unix ms, key) → (): the sweep's work list, in deadline order.
pub(crate) const EXPIRY: TableDefinition<'static, (u64, &'static str), ()> =
    TableDefinition::new("anykv_expiry");
/// Revision → the events of that revision: the bounded watch history.
pub(crate) const EVENTS: TableDefinition<'static, u64, &'static [u8]> =
    TableDefinition::new("anykv_events");
/// File-level facts: the format marker.
pub(crate) const META: TableDefinition<'static, &'static str, u64> =
    TableDefinition::new("anykv_meta");

/// Session id → deadline (Unix ms): the live sessions (see `anykv_core::embedded::session`).
pub(crate) const SESSIONS: TableDefinition<'static, u64, u64> =
    TableDefinition::new("anykv_sessions");
/// (session id, key) → revision of the session's write of the key: its
/// ephemeral keys, deleted when it ends if still at that revision.
pub(crate) const SESSION_KEYS: TableDefinition<'static, (u64, &'static str), u64> =
    TableDefinition::new("anykv_session_keys");

pub(crate) const META_FORMAT: &str = "format";
/// The last session id handed out.
pub(crate) const META_SESSION_SEQ: &str = "session_seq";
/// The revision of the last `compact` (absent: never compacted by hand).
pub(crate) const META_COMPACTED: &str = "compacted";
/// Bumped on any incompatible change of the layout above. The store
/// revision is the last key of [`EVENTS`] (see the writer).
pub(crate) const FORMAT: u64 = 1;

/// A read snapshot shared by point reads until the next commit.
///
/// Beginning a redb read transaction and opening the table costs about
/// twice the lookup itself; reads between two commits reuse one snapshot
/// instead. The writer drops the cached snapshot at every commit (before
/// publishing the new revision), so a snapshot never pins the pages a later
/// commit frees for longer than one commit, and every read that starts after
/// a write was acknowledged sees it.
pub(crate) struct Snapshot {
    /// The committed revision when it was taken (it holds at least that).
    rev: Revision,
    kv: redb::ReadOnlyTable<&'static str, &'static [u8]>,
    _txn: ReadTransaction,
}

/// Where the current [`Snapshot`] is kept; shared with the writer.
pub(crate) type SnapshotSlot = Arc<RwLock<Option<Arc<Snapshot>>>>;

/// How long an open waits for this process's own just-closed handle on the
/// same file to let go of redb's lock (a read finishing on another thread).
/// Another process holding the file is reported after at most this long.
const REOPEN_GRACE: Duration = Duration::from_millis(500);

/// The key range strictly below `prefix`: `[prefix/, prefix0)` (`'0'` is the
/// byte after `'/'`), or everything for the root.
pub(crate) fn prefix_range(prefix: &Prefix) -> (String, Option<String>) {
    if prefix.is_root() {
        (String::new(), None)
    } else {
        (prefix.dir(), Some(format!("{}0", prefix.as_str())))
    }
}

/// The oldest revision a watch may start after: history before it is
/// pruned. The log's first revision minus one (the current revision when
/// the log is empty), or the last `compact`, whichever is newer (a compact
/// at the current revision keeps that revision's entry, which holds the
/// revision counter).
pub(crate) fn compacted_floor(
    meta: &impl ReadableTable<&'static str, u64>,
    events: &impl ReadableTable<u64, &'static [u8]>,
    current: Revision,
) -> Result<Revision, redb::StorageError> {
    let pruned = events
        .first()?
        .map_or(current, |(k, _)| k.value().saturating_sub(1));
    let compacted = meta.get(META_COMPACTED)?.map_or(0, |v| v.value());
    Ok(pruned.max(compacted))
}

/// Per-file options from the URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Revisions of history kept for watches (`?history=`), at least; the
    /// log is pruned in steps of up to 256 revisions beyond it.
    pub history: u64,
    /// Longest delay between a TTL running out and the key's deletion being
    /// committed and sent to watchers (`?sweep_interval=`). Reads treat an
    /// expired key as absent at once.
    pub sweep_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            history: 10_000,
            sweep_interval: Duration::from_millis(100),
        }
    }
}

/// One open file.
pub(crate) struct Engine {
    pub(crate) path: PathBuf,
    pub(crate) settings: Settings,
    db: RwLock<Option<Arc<Database>>>,
    snapshot: SnapshotSlot,
    tx: mpsc::Sender<Cmd>,
    /// Writes sent to the writer and not yet answered.
    inflight: Arc<AtomicUsize>,
    writer: Mutex<Option<JoinHandle<()>>>,
    committed: Arc<AtomicU64>,
    /// The watches, fed by the writer after each commit.
    pub(crate) hub: Arc<Hub>,
    pub(crate) locks: LockTable,
    /// The test hook that stops session renewals.
    pub(crate) renewals: anykv_core::embedded::session::Renewals,
    handles: AtomicUsize,
    closed: AtomicBool,
}

struct Registry {
    open: HashMap<PathBuf, Weak<Engine>>,
    /// Files this process closed recently: a read transaction still ending
    /// on another thread may hold redb's file lock for a moment.
    recently_closed: HashMap<PathBuf, Instant>,
}

fn registry() -> MutexGuard<'static, Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| {
            Mutex::new(Registry {
                open: HashMap::new(),
                recently_closed: HashMap::new(),
            })
        })
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The absolute path of `location` with its directory resolved, so that
/// two spellings of one file share one engine.
pub(crate) fn resolve(location: &Path) -> std::io::Result<PathBuf> {
    let abs = std::path::absolute(location)?;
    if let Ok(real) = abs.canonicalize() {
        return Ok(real);
    }
    match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(name)) => Ok(dir.canonicalize()?.join(name)),
        _ => Ok(abs),
    }
}

impl Engine {
    /// Opens (or joins) the engine of `path`, which must be resolved.
    /// Blocking: run it on a blocking thread.
    pub(crate) fn open(path: PathBuf, settings: Settings) -> Result<Arc<Engine>> {
        let mut reg = registry();
        if let Some(engine) = reg.open.get(&path).and_then(Weak::upgrade) {
            if engine.settings != settings {
                return Err(Error::InvalidArgument {
                    backend: BACKEND,
                    message: format!(
                        "{} is already open in this process with history={} and sweep_interval={:?}",
                        path.display(),
                        engine.settings.history,
                        engine.settings.sweep_interval
                    ),
                });
            }
            engine.handles.fetch_add(1, Ordering::SeqCst);
            return Ok(engine);
        }
        let grace = reg
            .recently_closed
            .get(&path)
            .map(|at| REOPEN_GRACE.saturating_sub(at.elapsed()))
            .unwrap_or_default();
        reg.recently_closed
            .retain(|_, at| at.elapsed() < REOPEN_GRACE);
        let engine = Arc::new(Engine::create(path.clone(), settings, grace)?);
        reg.open.insert(path, Arc::downgrade(&engine));
        Ok(engine)
    }

    fn create(path: PathBuf, settings: Settings, grace: Duration) -> Result<Engine> {
        let context = format!("open {}", path.display());
        let started = Instant::now();
        let db = loop {
            match Database::builder().create(&path) {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if started.elapsed() < grace => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(error::from(&context, e)),
            }
        };
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let hub = Arc::new(Hub::default());
        let committed = Arc::new(AtomicU64::new(0));
        let snapshot = SnapshotSlot::default();
        let inflight = Arc::new(AtomicUsize::new(0));
        let handle = Writer::start(
            db.clone(),
            snapshot.clone(),
            rx,
            committed.clone(),
            hub.clone(),
            inflight.clone(),
            WriterSettings {
                history: settings.history,
                sweep_interval: settings.sweep_interval,
            },
        )?;
        Ok(Engine {
            path,
            settings,
            db: RwLock::new(Some(db)),
            snapshot,
            tx,
            inflight,
            writer: Mutex::new(Some(handle)),
            committed,
            hub,
            locks: LockTable::default(),
            renewals: Default::default(),
            handles: AtomicUsize::new(1),
            closed: AtomicBool::new(false),
        })
    }

    /// Gives up one store handle; the last one shuts the engine down.
    /// Blocking (joins the writer thread).
    pub(crate) fn release_handle(self: &Arc<Self>) {
        let last = {
            let mut reg = registry();
            let last = self.handles.fetch_sub(1, Ordering::SeqCst) == 1;
            if last {
                let ours = reg
                    .open
                    .get(&self.path)
                    .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(self)));
                if ours {
                    reg.open.remove(&self.path);
                }
                reg.recently_closed
                    .insert(self.path.clone(), Instant::now());
            }
            last
        };
        if last {
            self.shutdown();
        }
    }

    /// Finishes queued writes, stops the writer, closes the file, ends
    /// watches (with an error item) and marks held locks lost.
    fn shutdown(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = self.tx.send(Cmd::Shutdown);
        if let Some(h) = lock(&self.writer).take()
            && h.join().is_err()
        {
            tracing::error!(path = %self.path.display(), "redb writer thread panicked");
        }
        self.hub.close();
        self.db.write().unwrap_or_else(|p| p.into_inner()).take();
        self.locks.clear();
    }

    /// True once the engine is shut down.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// The last committed revision.
    pub(crate) fn committed(&self) -> Revision {
        self.committed.load(Ordering::SeqCst)
    }

    // ---- writes ---------------------------------------------------------------

    /// Queues a write and waits until it is durable.
    pub(crate) async fn write(&self, op: WriteOp) -> Result<u64> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteReq {
            op,
            reply: Some(reply),
        })?;
        rx.await.map_err(|_| error::closed())?
    }

    /// Queues a write without waiting for it (lock release from `Drop`).
    pub(crate) fn write_detached(&self, op: WriteOp) {
        let _ = self.send(WriteReq { op, reply: None });
    }

    fn send(&self, req: WriteReq) -> Result<()> {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.tx.send(Cmd::Write(req)).map_err(|_| {
            self.inflight.fetch_sub(1, Ordering::Relaxed);
            error::closed()
        })
    }

    // ---- reads ----------------------------------------------------------------

    /// A read transaction on the latest committed state.
    pub(crate) fn read_txn(&self) -> Result<ReadTransaction> {
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        let db = guard.as_ref().ok_or_else(error::closed)?;
        db.begin_read()
            .map_err(|e| error::from("begin a read transaction", e))
    }

    /// The snapshot for point reads: the cached one if no commit happened
    /// since it was taken, else a fresh one (then cached).
    fn snapshot(&self) -> Result<Arc<Snapshot>> {
        let rev = self.committed.load(Ordering::SeqCst);
        if let Some(s) = self
            .snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            && s.rev == rev
        {
            return Ok(s.clone());
        }
        let txn = self.read_txn()?;
        let kv = txn
            .open_table(KV)
            .map_err(|e| error::from("open table", e))?;
        let snap = Arc::new(Snapshot { rev, kv, _txn: txn });
        let mut slot = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
        // Never cache after shutdown: it would keep the file locked.
        if !self.is_closed() {
            *slot = Some(snap.clone());
        }
        Ok(snap)
    }

    /// Reads one key. Cheap enough (a B-tree lookup in redb's cache, in a
    /// shared snapshot) to run on the async thread: see the crate docs.
    pub(crate) fn get(&self, key: &Key) -> Result<Option<KvPair>> {
        self.lookup(key, |raw| {
            let rec = codec::decode_record(raw).map_err(error::corrupt)?;
            // The clock is read only for keys with a TTL.
            if rec.expires_ms != 0 && rec.expired(now_ms()) {
                return Ok(None);
            }
            Ok(Some(rec.into_pair(key.clone())))
        })
        .map(Option::flatten)
    }

    /// Runs `read` on the stored record of `key`, if any, in the shared snapshot.
    fn lookup<T>(&self, key: &Key, read: impl FnOnce(&[u8]) -> Result<T>) -> Result<Option<T>> {
        let snap = self.snapshot()?;
        let raw = snap
            .kv
            .get(key.as_str())
            .map_err(|e| error::from("read", e))?;
        raw.map(|raw| read(raw.value())).transpose()
    }

    /// Whether a key exists, without copying its value.
    pub(crate) fn exists(&self, key: &Key) -> Result<bool> {
        let live = self.lookup(key, |raw| {
            let (_, _, expires) = codec::record_header(raw).map_err(error::corrupt)?;
            Ok(expires == 0 || expires > now_ms())
        })?;
        Ok(live == Some(true))
    }

    /// Visits every live pair strictly below `prefix` in key order, in one
    /// snapshot, until `visit` returns false. Blocking.
    pub(crate) fn scan(
        &self,
        prefix: &Prefix,
        mut visit: impl FnMut(Key, codec::Record) -> bool,
    ) -> Result<()> {
        let mut run = || -> Result<(), Failure> {
            let txn = self.read_txn().map_err(Failure::Kv)?;
            let table = txn.open_table(KV)?;
            self.visit(&table, prefix, now_ms(), &mut visit)?;
            Ok(())
        };
        run().map_err(|f| f.into_error("scan"))
    }

    /// Visits the live pairs below `prefix` in `table`; false if `visit`
    /// stopped early (or the engine closed).
    fn visit(
        &self,
        table: &redb::ReadOnlyTable<&'static str, &'static [u8]>,
        prefix: &Prefix,
        now: u64,
        visit: &mut impl FnMut(Key, codec::Record) -> bool,
    ) -> Result<bool, Failure> {
        let (lo, hi) = prefix_range(prefix);
        let range = match &hi {
            Some(hi) => table.range(lo.as_str()..hi.as_str())?,
            None => table.range::<&str>(lo.as_str()..)?,
        };
        for item in range {
            let (k, v) = item?;
            let rec =
                codec::decode_record(v.value()).map_err(|c| Failure::Kv(error::corrupt(c)))?;
            if rec.expired(now) {
                continue;
            }
            let Some(key) = Key::from_backend(k.value()) else {
                continue;
            };
            if !visit(key, rec) || self.is_closed() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Every live pair below each of `prefixes` and the store revision, all
    /// from one read transaction. Blocking.
    pub(crate) fn snapshot_of(&self, prefixes: &[Prefix]) -> Result<anykv_core::Snapshot> {
        let run = || -> Result<anykv_core::Snapshot, Failure> {
            let txn = self.read_txn().map_err(Failure::Kv)?;
            let table = txn.open_table(KV)?;
            // The log's last key is the store revision (see the writer).
            let revision = txn
                .open_table(EVENTS)?
                .last()?
                .map_or(0, |(k, _)| k.value());
            let now = now_ms();
            let mut pairs = Vec::new();
            for prefix in prefixes {
                let whole = self.visit(&table, prefix, now, &mut |key, rec| {
                    pairs.push(rec.into_pair(key));
                    true
                })?;
                if !whole {
                    return Err(Failure::Kv(error::closed()));
                }
            }
            Ok(anykv_core::Snapshot { revision, pairs })
        };
        run().map_err(|f| f.into_error("snapshot"))
    }

    /// The distinct names one level below `prefix`, without copying values.
    /// Blocking.
    pub(crate) fn child_names(&self, prefix: &Prefix) -> Result<Vec<String>> {
        let run = || -> Result<Vec<String>, Failure> {
            let txn = self.read_txn().map_err(Failure::Kv)?;
            let table = txn.open_table(KV)?;
            let now = now_ms();
            let (lo, hi) = prefix_range(prefix);
            let mut names: Vec<String> = Vec::new();
            let mut next_lo = lo;
            // Skips each child's subtree with one seek instead of visiting it.
            loop {
                let mut range = match &hi {
                    Some(hi) => table.range(next_lo.as_str()..hi.as_str())?,
                    None => table.range::<&str>(next_lo.as_str()..)?,
                };
                let mut advanced = false;
                for item in range.by_ref() {
                    let (k, v) = item?;
                    let raw = k.value();
                    let (_, _, expires) = codec::record_header(v.value())
                        .map_err(|c| Failure::Kv(error::corrupt(c)))?;
                    if (expires != 0 && expires <= now) || Key::from_backend(raw).is_none() {
                        continue;
                    }
                    let Some(name) = prefix.child_name(raw) else {
                        continue;
                    };
                    names.push(name.to_owned());
                    // Next candidate: past "<dir><name>/…" when inside the
                    // child's subtree; right after the key itself when it is
                    // exactly "<dir><name>" (keys like "<name>-x" sort
                    // between it and its subtree).
                    let dir = prefix.dir();
                    next_lo = if raw.len() == dir.len() + name.len() {
                        format!("{raw}\0")
                    } else {
                        format!("{dir}{name}0")
                    };
                    advanced = true;
                    break;
                }
                if !advanced {
                    break;
                }
            }
            // Key order is not name order: "a", "a-x", "a/b" give a, a-x, a.
            names.sort_unstable();
            names.dedup();
            Ok(names)
        };
        run().map_err(|f| f.into_error("list names"))
    }

    /// Up to `max` logged revisions after `after`, with their events, from
    /// one snapshot; `Error::Compacted` if `after` is older than the log.
    /// Blocking.
    pub(crate) fn replay(
        &self,
        after: Revision,
        max: usize,
    ) -> Result<Vec<(Revision, Vec<Event>)>> {
        let run = || -> Result<Vec<(Revision, Vec<Event>)>, Failure> {
            let txn = self.read_txn().map_err(Failure::Kv)?;
            let events = txn.open_table(EVENTS)?;
            let meta = txn.open_table(META)?;
            let last = events.last()?.map_or(0, |(k, _)| k.value());
            let compacted = compacted_floor(&meta, &events, last)?;
            if after < compacted {
                return Err(Failure::Kv(Error::Compacted {
                    backend: BACKEND,
                    revision: after,
                    oldest: compacted + 1,
                }));
            }
            let mut out = Vec::new();
            for item in events.range((Bound::Excluded(after), Bound::Unbounded))? {
                let (k, v) = item?;
                let rev = k.value();
                let evs = codec::decode_events(rev, v.value())
                    .map_err(|c| Failure::Kv(error::corrupt(c)))?;
                out.push((rev, evs));
                if out.len() >= max {
                    break;
                }
            }
            Ok(out)
        };
        run().map_err(|f| f.into_error("read the event log"))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}
