//! The dedicated writer thread: every write goes through it, and it
//! group-commits whatever is queued into one durable redb transaction.
//!
//! Why one thread: redb allows one write transaction at a time and each
//! durable commit costs an fsync. While one batch is being fsynced, new
//! requests pile up in the channel; the next transaction takes all of them,
//! so N concurrent writers pay for roughly one fsync instead of N. A caller's
//! future resolves only after the transaction holding its write committed.
//!
//! A request whose condition fails changes nothing and does not disturb the
//! others in its batch. A request that hits a storage error aborts the
//! transaction; the batch is then retried once without it, so one bad
//! request cannot fail its neighbours.
//!
//! The thread also sweeps expired keys (TTL), logs every change in the event
//! table (pruned to the configured history), and publishes each committed
//! batch of events to the live watchers.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anykv_core::{
    Bytes, Check, Condition, Error, Event, Key, Op, Prefix, Result, Revision, Version,
    store::condition,
};
use redb::{Database, ReadableTable, Table, WriteTransaction};
use tokio::sync::oneshot;

use crate::{
    codec::{self, Record},
    engine::{
        EVENTS, EXPIRY, FORMAT, KV, META, META_COMPACTED, META_FORMAT, META_SESSION_SEQ,
        SESSION_KEYS, SESSIONS, SnapshotSlot, compacted_floor, prefix_range,
    },
    error::{self, BACKEND, Failure},
    hub::Hub,
};

/// Most requests in one transaction; bounds latency of the first in a batch.
const MAX_BATCH: usize = 1024;
/// Most value bytes in one transaction.
const MAX_BATCH_BYTES: usize = 64 << 20;
/// Longest wait for more writes before committing a batch (see `run`).
const MAX_GATHER: Duration = Duration::from_millis(2);
/// How long a peak of concurrent writers is remembered (see `gather`).
const PEAK_WINDOW: Duration = Duration::from_millis(200);
/// Most expired keys removed by one sweep transaction.
const MAX_SWEEP: usize = 10_000;
/// Where anykv keeps lock records (their holders live in this process only).
const LOCK_RECORDS: &str = "__anykv/locks";

/// A message to the writer thread.
pub(crate) enum Cmd {
    /// A write to commit.
    Write(WriteReq),
    /// Finish the queued writes and stop.
    Shutdown,
}

/// One write and where to send its outcome.
pub(crate) struct WriteReq {
    pub(crate) op: WriteOp,
    /// `None` for fire-and-forget writes (lock release from `Drop`).
    pub(crate) reply: Option<oneshot::Sender<Result<u64>>>,
}

/// The writes the thread knows. Each answers with a `u64`: a revision
/// (put, atomic), 0/1 (delete) or a count (delete_prefix, import).
pub(crate) enum WriteOp {
    Put {
        key: Key,
        value: Bytes,
        condition: Condition,
        ttl: Option<Duration>,
    },
    Delete {
        key: Key,
        condition: Condition,
    },
    DeletePrefix {
        prefix: Prefix,
    },
    Atomic {
        checks: Vec<Check>,
        ops: Vec<Op>,
    },
    Import {
        pairs: Vec<(Key, Bytes)>,
    },
    /// Drop the event log up to a revision (answers 0).
    Compact {
        revision: Revision,
    },
    /// Record a session alive for `ttl` (answers its id).
    SessionBegin {
        ttl: Duration,
    },
    /// Push a session's deadline (`None`: only check it); answers 1 if it
    /// is alive, 0 if it is gone.
    SessionRenew {
        id: u64,
        ttl: Option<Duration>,
    },
    /// An ephemeral put (answers its revision).
    SessionPut {
        id: u64,
        key: Key,
        value: Bytes,
        condition: Condition,
    },
    /// End a session, deleting its keys (answers 1, or 0 if already gone).
    SessionEnd {
        id: u64,
    },
}

impl WriteOp {
    fn weight(&self) -> usize {
        match self {
            WriteOp::Put { value, .. } | WriteOp::SessionPut { value, .. } => value.len(),
            WriteOp::Atomic { ops, .. } => ops
                .iter()
                .map(|o| match o {
                    Op::Put(_, v) => v.len(),
                    Op::Delete(_) => 0,
                })
                .sum(),
            WriteOp::Import { pairs } => pairs.iter().map(|(_, v)| v.len()).sum(),
            WriteOp::Delete { .. }
            | WriteOp::DeletePrefix { .. }
            | WriteOp::Compact { .. }
            | WriteOp::SessionBegin { .. }
            | WriteOp::SessionRenew { .. }
            | WriteOp::SessionEnd { .. } => 0,
        }
    }
}

/// Settings the writer needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WriterSettings {
    pub(crate) history: u64,
    pub(crate) sweep_interval: Duration,
}

/// Milliseconds since the Unix epoch: TTL deadlines survive restarts, so
/// they are wall-clock times.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The tables of one write transaction. The expiry table is opened only
/// when a TTL is involved: every table a transaction opens costs time, and a
/// commit touches only what it must.
struct Tables<'t> {
    txn: &'t WriteTransaction,
    kv: Table<'t, &'static str, &'static [u8]>,
    events: Table<'t, u64, &'static [u8]>,
    expiry: Option<Table<'t, (u64, &'static str), ()>>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, Failure> {
        Ok(Tables {
            txn,
            kv: txn.open_table(KV)?,
            events: txn.open_table(EVENTS)?,
            expiry: None,
        })
    }

    fn expiry(&mut self) -> Result<&mut Table<'t, (u64, &'static str), ()>, Failure> {
        match &mut self.expiry {
            Some(t) => Ok(t),
            slot @ None => Ok(slot.insert(self.txn.open_table(EXPIRY)?)),
        }
    }
}

/// The state of one write transaction being built.
struct Ctx<'t> {
    t: Tables<'t>,
    rev: Revision,
    /// The oldest revision a watch may start after (see `compacted_floor`).
    compacted: Revision,
    now: u64,
    /// Events in revision order; every event of a revision is contiguous.
    events: Vec<Event>,
    /// Set by changes that take no revision (stale expiry entries removed).
    dirty: bool,
    /// The sessions table changed: its earliest deadline is read again.
    sessions_touched: bool,
}

type Outcome = Result<u64>;

impl Ctx<'_> {
    fn next_rev(&mut self) -> Revision {
        self.rev += 1;
        self.rev
    }

    fn load(&self, key: &str) -> Result<Option<Record>, Failure> {
        match self.t.kv.get(key)? {
            None => Ok(None),
            Some(raw) => codec::decode_record(raw.value())
                .map(Some)
                .map_err(|c| Failure::Kv(error::corrupt(c))),
        }
    }

    /// The key's live record; an expired one is deleted first (with its own
    /// revision and Delete event) and reported absent.
    fn live(&mut self, key: &Key) -> Result<Option<Record>, Failure> {
        match self.load(key.as_str())? {
            Some(r) if r.expired(self.now) => {
                let rev = self.next_rev();
                self.remove(key, &r, rev)?;
                Ok(None)
            }
            other => Ok(other),
        }
    }

    fn remove(&mut self, key: &Key, old: &Record, rev: Revision) -> Result<(), Failure> {
        self.t.kv.remove(key.as_str())?;
        if old.expires_ms != 0 {
            self.t.expiry()?.remove((old.expires_ms, key.as_str()))?;
        }
        self.events.push(Event::Delete {
            key: key.clone(),
            revision: rev,
        });
        Ok(())
    }

    fn write(
        &mut self,
        key: &Key,
        value: &Bytes,
        rev: Revision,
        expires_ms: u64,
        old: Option<Record>,
    ) -> Result<(), Failure> {
        let create_rev = old.as_ref().map_or(rev, |o| o.create_rev);
        self.t.kv.insert(
            key.as_str(),
            codec::encode_record(rev, create_rev, expires_ms, value).as_slice(),
        )?;
        if let Some(o) = &old
            && o.expires_ms != 0
            && o.expires_ms != expires_ms
        {
            self.t.expiry()?.remove((o.expires_ms, key.as_str()))?;
        }
        if expires_ms != 0 {
            self.t.expiry()?.insert((expires_ms, key.as_str()), ())?;
        }
        self.events.push(Event::Put {
            kv: Record {
                mod_rev: rev,
                create_rev,
                expires_ms,
                value: value.clone(),
            }
            .into_pair(key.clone()),
            prev: old.map(|o| o.into_pair(key.clone())),
        });
        Ok(())
    }

    fn apply(&mut self, op: &WriteOp) -> Result<Outcome, Failure> {
        match op {
            WriteOp::Put {
                key,
                value,
                condition,
                ttl,
            } => self.put(key, value, *condition, *ttl),
            WriteOp::Delete { key, condition } => self.delete(key, *condition),
            WriteOp::DeletePrefix { prefix } => self.delete_prefix(prefix),
            WriteOp::Atomic { checks, ops } => self.atomic(checks, ops),
            WriteOp::Compact { revision } => self.compact(*revision),
            WriteOp::SessionBegin { ttl } => self.session_begin(*ttl),
            WriteOp::SessionRenew { id, ttl } => self.session_renew(*id, *ttl),
            WriteOp::SessionPut {
                id,
                key,
                value,
                condition,
            } => self.session_put(*id, key, value, *condition),
            WriteOp::SessionEnd { id } => Ok(Ok(u64::from(self.session_end(*id)?))),
            WriteOp::Import { pairs } => {
                let mut n = 0;
                for (key, value) in pairs {
                    if let Err(e) = self.put(key, value, Condition::Always, None)? {
                        return Ok(Err(e));
                    }
                    n += 1;
                }
                Ok(Ok(n))
            }
        }
    }

    fn put(
        &mut self,
        key: &Key,
        value: &Bytes,
        cond: Condition,
        ttl: Option<Duration>,
    ) -> Result<Outcome, Failure> {
        let old = self.live(key)?;
        let current = old.as_ref().map(|r| Version::new(r.mod_rev));
        if let Err(e) = condition::check(BACKEND, key, cond, current) {
            return Ok(Err(e));
        }
        let expires_ms = ttl.map_or(0, |t| self.deadline(t));
        let rev = self.next_rev();
        self.write(key, value, rev, expires_ms, old)?;
        Ok(Ok(rev))
    }

    fn delete(&mut self, key: &Key, cond: Condition) -> Result<Outcome, Failure> {
        if cond == Condition::IfAbsent {
            return Ok(Err(Error::InvalidArgument {
                backend: BACKEND,
                message: "delete cannot be conditional on absence".into(),
            }));
        }
        let old = self.live(key)?;
        let current = old.as_ref().map(|r| Version::new(r.mod_rev));
        if let Err(e) = condition::check(BACKEND, key, cond, current) {
            return Ok(Err(e));
        }
        match old {
            None => Ok(Ok(0)),
            Some(old) => {
                let rev = self.next_rev();
                self.remove(key, &old, rev)?;
                Ok(Ok(1))
            }
        }
    }

    fn delete_prefix(&mut self, prefix: &Prefix) -> Result<Outcome, Failure> {
        // Collected first: the table cannot be changed while iterated.
        let mut found: Vec<(String, u64)> = Vec::new();
        {
            let (lo, hi) = prefix_range(prefix);
            let range = match &hi {
                Some(hi) => self.t.kv.range(lo.as_str()..hi.as_str())?,
                None => self.t.kv.range::<&str>(lo.as_str()..)?,
            };
            for item in range {
                let (k, v) = item?;
                let (_, _, expires) =
                    codec::record_header(v.value()).map_err(|c| Failure::Kv(error::corrupt(c)))?;
                found.push((k.value().to_owned(), expires));
            }
        }
        if found.is_empty() {
            return Ok(Ok(0));
        }
        // One revision for the whole prefix, like one etcd range delete.
        let rev = self.next_rev();
        let mut live = 0;
        for (raw, expires) in found {
            self.t.kv.remove(raw.as_str())?;
            if expires != 0 {
                self.t.expiry()?.remove((expires, raw.as_str()))?;
            }
            if expires == 0 || expires > self.now {
                live += 1;
            }
            if let Some(key) = Key::from_backend(&raw) {
                self.events.push(Event::Delete { key, revision: rev });
            }
        }
        Ok(Ok(live))
    }

    fn atomic(&mut self, checks: &[Check], ops: &[Op]) -> Result<Outcome, Failure> {
        let mut state: Vec<(&Key, Option<Record>)> = Vec::new();
        for key in checks.iter().map(Check::key).chain(ops.iter().map(Op::key)) {
            if !state.iter().any(|(k, _)| *k == key) {
                let rec = self.live(key)?;
                state.push((key, rec));
            }
        }
        let find = |state: &[(&Key, Option<Record>)], key: &Key| -> Option<Record> {
            state
                .iter()
                .find(|(k, _)| *k == key)
                .and_then(|(_, r)| r.clone())
        };
        for check in checks {
            let rec = find(&state, check.key());
            if !check.holds(rec.as_ref().map(|r| (&r.value, Version::new(r.mod_rev)))) {
                return Ok(Err(condition::failed_check(BACKEND, check)));
            }
        }
        let changes = ops.iter().any(|op| match op {
            Op::Put(..) => true,
            Op::Delete(k) => find(&state, k).is_some(),
        });
        if !changes {
            return Ok(Ok(self.rev));
        }
        let rev = self.next_rev();
        for op in ops {
            let old = find(&state, op.key());
            match op {
                Op::Put(key, value) => self.write(key, value, rev, 0, old)?,
                Op::Delete(key) => {
                    if let Some(old) = old {
                        self.remove(key, &old, rev)?;
                    }
                }
            }
        }
        Ok(Ok(rev))
    }

    /// Drops the logged revisions up to `rev` and records `rev` durably as
    /// the compacted point.
    fn compact(&mut self, rev: Revision) -> Result<Outcome, Failure> {
        if rev > self.rev {
            return Ok(Err(Error::InvalidArgument {
                backend: BACKEND,
                message: format!(
                    "cannot compact at revision {rev}: the store is at revision {}",
                    self.rev
                ),
            }));
        }
        if rev <= self.compacted {
            return Ok(Ok(0));
        }
        // The current revision's entry stays: the log's last key is where
        // the revision counter persists.
        let upto = if rev == self.rev { rev - 1 } else { rev };
        self.t.events.retain_in(..=upto, |_, _| false)?;
        self.t.txn.open_table(META)?.insert(META_COMPACTED, rev)?;
        self.compacted = rev;
        self.dirty = true;
        Ok(Ok(0))
    }

    /// Deletes keys whose TTL ran out, in one revision, and ends the
    /// sessions whose deadline passed.
    fn sweep(&mut self, sessions_due: bool) -> Result<(), Failure> {
        if sessions_due {
            self.end_sessions(false)?;
        }
        let mut due: Vec<(u64, String)> = Vec::new();
        for item in self.t.expiry()?.range(..(self.now + 1, ""))? {
            let (k, _) = item?;
            let (expires, key) = k.value();
            due.push((expires, key.to_owned()));
            if due.len() >= MAX_SWEEP {
                break;
            }
        }
        let mut rev = None;
        for (expires, raw) in due {
            self.t.expiry()?.remove((expires, raw.as_str()))?;
            self.dirty = true;
            let Some(rec) = self.load(&raw)? else {
                continue;
            };
            if rec.expires_ms != expires {
                continue;
            }
            let r = match rev {
                Some(r) => r,
                None => *rev.insert(self.next_rev()),
            };
            self.t.kv.remove(raw.as_str())?;
            if let Some(key) = Key::from_backend(&raw) {
                self.events.push(Event::Delete { key, revision: r });
            }
        }
        Ok(())
    }

    /// Unix ms `ttl` from now, at least 1 ms ahead (0 means "no TTL").
    fn deadline(&self, ttl: Duration) -> u64 {
        self.now
            .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
    }

    fn session_begin(&mut self, ttl: Duration) -> Result<Outcome, Failure> {
        let id = {
            let mut meta = self.t.txn.open_table(META)?;
            let id = meta.get(META_SESSION_SEQ)?.map_or(0, |v| v.value()) + 1;
            meta.insert(META_SESSION_SEQ, id)?;
            id
        };
        let deadline = self.deadline(ttl);
        self.t.txn.open_table(SESSIONS)?.insert(id, deadline)?;
        self.sessions_touched = true;
        self.dirty = true;
        Ok(Ok(id))
    }

    /// True if the session is alive; one past its deadline is ended now.
    fn session_live(&mut self, id: u64) -> Result<bool, Failure> {
        let deadline = self.t.txn.open_table(SESSIONS)?.get(id)?.map(|v| v.value());
        match deadline {
            None => Ok(false),
            Some(d) if d <= self.now => {
                self.session_end(id)?;
                Ok(false)
            }
            Some(_) => Ok(true),
        }
    }

    fn session_renew(&mut self, id: u64, ttl: Option<Duration>) -> Result<Outcome, Failure> {
        if !self.session_live(id)? {
            return Ok(Ok(0));
        }
        if let Some(ttl) = ttl {
            let deadline = self.deadline(ttl);
            self.t.txn.open_table(SESSIONS)?.insert(id, deadline)?;
            self.sessions_touched = true;
            self.dirty = true;
        }
        Ok(Ok(1))
    }

    fn session_put(
        &mut self,
        id: u64,
        key: &Key,
        value: &Bytes,
        cond: Condition,
    ) -> Result<Outcome, Failure> {
        if !self.session_live(id)? {
            return Ok(Err(Error::LockLost {
                backend: BACKEND,
                key: key.to_string(),
            }));
        }
        let out = self.put(key, value, cond, None)?;
        if let Ok(rev) = out {
            self.t
                .txn
                .open_table(SESSION_KEYS)?
                .insert((id, key.as_str()), rev)?;
        }
        Ok(out)
    }

    /// Ends a session: its keys still at the revision it wrote them are
    /// deleted in one revision. False if it was already gone.
    fn session_end(&mut self, id: u64) -> Result<bool, Failure> {
        if self.t.txn.open_table(SESSIONS)?.remove(id)?.is_none() {
            return Ok(false);
        }
        self.sessions_touched = true;
        self.dirty = true;
        let mut keys: Vec<(String, u64)> = Vec::new();
        {
            let mut table = self.t.txn.open_table(SESSION_KEYS)?;
            for item in table.range((id, "")..(id + 1, ""))? {
                let (k, v) = item?;
                keys.push((k.value().1.to_owned(), v.value()));
            }
            table.retain_in((id, "")..(id + 1, ""), |_, _| false)?;
        }
        let mut rev = None;
        for (raw, written) in keys {
            let Some(rec) = self.load(&raw)? else {
                continue;
            };
            // Rewritten since by someone else: no longer this session's.
            if rec.mod_rev != written {
                continue;
            }
            let r = match rev {
                Some(r) => r,
                None => *rev.insert(self.next_rev()),
            };
            if let Some(key) = Key::from_backend(&raw) {
                self.remove(&key, &rec, r)?;
            }
        }
        Ok(true)
    }

    /// Ends the sessions whose deadline passed (with `all`: every session,
    /// for a reopened file, whose sessions all belonged to a dead process).
    fn end_sessions(&mut self, all: bool) -> Result<(), Failure> {
        let mut due = Vec::new();
        for item in self.t.txn.open_table(SESSIONS)?.iter()? {
            let (id, deadline) = item?;
            if all || deadline.value() <= self.now {
                due.push(id.value());
            }
        }
        for id in due {
            self.session_end(id)?;
        }
        Ok(())
    }

    /// The earliest session deadline: read again only if this transaction
    /// changed the sessions table, else `known`.
    fn next_deadline(&self, known: Option<u64>) -> Result<Option<u64>, Failure> {
        if !self.sessions_touched {
            return Ok(known);
        }
        let mut min: Option<u64> = None;
        for item in self.t.txn.open_table(SESSIONS)?.iter()? {
            let d = item?.1.value();
            min = Some(min.map_or(d, |m| m.min(d)));
        }
        Ok(min)
    }

    /// Removes lock records left by a previous run: their holders were in a
    /// process that no longer has the file open, so the locks are free.
    fn drop_stale_locks(&mut self) -> Result<(), Failure> {
        let lo = format!("{LOCK_RECORDS}/");
        let hi = format!("{LOCK_RECORDS}0");
        let mut stale = Vec::new();
        for item in self.t.kv.range(lo.as_str()..hi.as_str())? {
            let (k, v) = item?;
            let (_, _, expires) =
                codec::record_header(v.value()).map_err(|c| Failure::Kv(error::corrupt(c)))?;
            stale.push((k.value().to_owned(), expires));
        }
        if stale.is_empty() {
            return Ok(());
        }
        let rev = self.next_rev();
        for (raw, expires) in stale {
            self.t.kv.remove(raw.as_str())?;
            if expires != 0 {
                self.t.expiry()?.remove((expires, raw.as_str()))?;
            }
            if let Some(key) = Key::from_backend(&raw) {
                self.events.push(Event::Delete { key, revision: rev });
            }
        }
        Ok(())
    }

    /// Logs this transaction's events and prunes the history.
    ///
    /// The event log is also where the revision counter persists: its last
    /// key is the current revision and its first key, minus one, the
    /// compacted floor (pruning always keeps the latest revision). So a
    /// commit touches one extra table, not two.
    fn finish(&mut self, history: u64) -> Result<(), Failure> {
        let mut i = 0;
        while i < self.events.len() {
            let rev = self.events[i].revision();
            let mut j = i;
            while j < self.events.len() && self.events[j].revision() == rev {
                j += 1;
            }
            self.t
                .events
                .insert(rev, codec::encode_events(&self.events[i..j]).as_slice())?;
            i = j;
        }
        // Pruned in steps, so that most commits leave the log's oldest page
        // alone: the log keeps between `history` and `history + step`.
        let step = (history / 16).clamp(1, 256);
        let cutoff = self.rev.saturating_sub(history);
        if cutoff >= self.compacted.saturating_add(step) {
            self.t.events.retain_in(..=cutoff, |_, _| false)?;
            self.compacted = cutoff;
        }
        Ok(())
    }

    /// The earliest expiry after this transaction: read again only if the
    /// transaction touched the expiry table, else `known`.
    fn next_expiry(&self, known: Option<u64>) -> Result<Option<u64>, Failure> {
        match &self.t.expiry {
            Some(t) => Ok(t.first()?.map(|(k, _)| k.value().0)),
            None => Ok(known),
        }
    }
}

/// The writer thread's state.
pub(crate) struct Writer {
    db: Arc<Database>,
    snapshot: SnapshotSlot,
    rx: mpsc::Receiver<Cmd>,
    committed: Arc<AtomicU64>,
    hub: Arc<Hub>,
    settings: WriterSettings,
    rev: Revision,
    compacted: Revision,
    next_expiry: Option<u64>,
    /// The earliest session deadline.
    next_deadline: Option<u64>,
    last_sweep: Instant,
    /// Writes submitted and not yet answered (shared with the engine).
    inflight: Arc<AtomicUsize>,
    /// The most writes seen in flight at once, lately: how many writers
    /// are active, i.e. how large a batch can get.
    peak: usize,
    peak_at: Instant,
    /// How long the last non-empty batch took to commit.
    last_commit: Duration,
}

impl Writer {
    /// Prepares the file (tables, format marker, stale locks) and starts the
    /// thread. Runs on a blocking thread.
    pub(crate) fn start(
        db: Arc<Database>,
        snapshot: SnapshotSlot,
        rx: mpsc::Receiver<Cmd>,
        committed: Arc<AtomicU64>,
        hub: Arc<Hub>,
        inflight: Arc<AtomicUsize>,
        settings: WriterSettings,
    ) -> Result<JoinHandle<()>> {
        let (rev, compacted, next_expiry) =
            init(&db, settings.history).map_err(|f| f.into_error("prepare the file"))?;
        // `init` ended every session left in the file.
        let next_deadline = None;
        committed.store(rev, Ordering::SeqCst);
        let writer = Writer {
            db,
            snapshot,
            rx,
            committed,
            hub,
            settings,
            rev,
            compacted,
            next_expiry,
            next_deadline,
            last_sweep: Instant::now()
                .checked_sub(settings.sweep_interval)
                .unwrap_or_else(Instant::now),
            inflight,
            peak: 0,
            peak_at: Instant::now(),
            last_commit: Duration::ZERO,
        };
        let handle = std::thread::Builder::new()
            .name("anykv-redb-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| Error::backend(BACKEND, "cannot start the writer thread", e))?;
        Ok(handle)
    }

    /// When the next sweep may run: the earliest expiry, but no sooner than
    /// one sweep interval after the last sweep (expired keys already read
    /// as absent; the sweep only makes their deletion durable and visible to
    /// watchers, so batching sweeps is cheap and honest).
    fn sweep_wait(&self) -> Option<Duration> {
        let next = match (self.next_expiry, self.next_deadline) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        let until_expiry = Duration::from_millis(next.saturating_sub(now_ms()));
        let until_interval = self
            .settings
            .sweep_interval
            .saturating_sub(self.last_sweep.elapsed());
        Some(until_expiry.max(until_interval))
    }

    fn run(mut self) {
        loop {
            let first = match self.sweep_wait() {
                Some(wait) if wait.is_zero() => match self.rx.try_recv() {
                    Ok(c) => Some(c),
                    Err(mpsc::TryRecvError::Empty) => None,
                    Err(mpsc::TryRecvError::Disconnected) => break,
                },
                Some(wait) => match self.rx.recv_timeout(wait) {
                    Ok(c) => Some(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                },
                None => match self.rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => break,
                },
            };
            let (batch, shutdown) = match first {
                Some(cmd) => self.gather(cmd),
                None => (Vec::new(), false), // a sweep is due
            };
            let size = batch.len();
            let started = Instant::now();
            self.commit(batch);
            if size > 0 {
                self.last_commit = started.elapsed();
            }
            if shutdown {
                break;
            }
        }
        // Whatever is still queued gets a clear answer rather than a hang.
        while let Ok(cmd) = self.rx.try_recv() {
            if let Cmd::Write(req) = cmd {
                self.reply(req, Err(error::closed()));
            }
        }
    }

    /// Collects the batch that starts with `first`: everything queued and,
    /// while fewer writes are in hand than writers were recently active, the
    /// stragglers that arrive within half a commit. Returns the batch and
    /// whether to shut down.
    ///
    /// Why wait: after a commit answers its writers, they re-submit within
    /// microseconds, but not all before the queue looks empty. Without the
    /// wait, N writers settle into two half-size cohorts committing in turn,
    /// each paying a full commit; with it they share one. At concurrency 1
    /// the target is 1, so a lone writer never waits.
    fn gather(&mut self, first: Cmd) -> (Vec<WriteReq>, bool) {
        let target = self.peak.max(1) * 9 / 10;
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut next = Some(first);
        let mut until: Option<Instant> = None;
        loop {
            let Some(cmd) = next.take() else {
                if batch.is_empty() || batch.len() >= target {
                    return (batch, false);
                }
                let deadline = *until
                    .get_or_insert_with(|| Instant::now() + (self.last_commit / 2).min(MAX_GATHER));
                match self
                    .rx
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                {
                    Ok(c) => {
                        next = Some(c);
                        continue;
                    }
                    Err(_) => return (batch, false),
                }
            };
            match cmd {
                Cmd::Write(req) => {
                    bytes += req.op.weight();
                    batch.push(req);
                }
                Cmd::Shutdown => return (batch, true),
            }
            if batch.len() >= MAX_BATCH || bytes >= MAX_BATCH_BYTES {
                return (batch, false);
            }
            next = self.rx.try_recv().ok();
        }
    }

    /// Notes how many writes are in flight right before a batch is
    /// answered (its own plus those queued meanwhile); the peak decays
    /// after a quiet spell so that a past burst does not keep batches
    /// waiting.
    fn sample_concurrency(&mut self) {
        let now = self.inflight.load(Ordering::Relaxed);
        if now >= self.peak || self.peak_at.elapsed() > PEAK_WINDOW {
            self.peak = now;
            self.peak_at = Instant::now();
        }
    }

    /// Answers one request.
    fn reply(&self, req: WriteReq, result: Result<u64>) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
        if let Some(reply) = req.reply {
            let _ = reply.send(result);
        }
    }

    fn sweep_due(&self) -> bool {
        self.sweep_wait().is_some_and(|w| w.is_zero())
    }

    /// Commits one batch and answers every request in it.
    fn commit(&mut self, batch: Vec<WriteReq>) {
        let sweep = self.sweep_due();
        if batch.is_empty() && !sweep {
            return;
        }
        let mut failed: Vec<Option<Error>> = (0..batch.len()).map(|_| None).collect();
        let mut retried = false;
        let outcome = loop {
            match self.try_commit(&batch, &failed, sweep) {
                Ok(done) => break Ok(done),
                Err(Abort::Request(i, e)) if !retried => {
                    // Retry once without the request that broke the transaction.
                    tracing::warn!(error = %e, "redb write failed; retrying its batch without it");
                    failed[i] = Some(e);
                    retried = true;
                }
                Err(Abort::Request(_, e) | Abort::Txn(e)) => break Err(e),
            }
        };
        if sweep {
            self.last_sweep = Instant::now();
        }
        match outcome {
            Ok(done) => {
                self.rev = done.rev;
                self.compacted = done.compacted;
                self.next_expiry = done.next_expiry;
                self.next_deadline = done.next_deadline;
                // Readers must not keep using a snapshot older than this
                // commit, and it must not pin the pages the commit freed.
                self.snapshot
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                self.committed.store(done.rev, Ordering::SeqCst);
                // Only the watches each event matches; never waits for one.
                self.hub.publish(&done.events);
                self.sample_concurrency();
                for ((req, outcome), failure) in batch.into_iter().zip(done.outcomes).zip(failed) {
                    let result = match failure {
                        Some(e) => Err(e),
                        None => outcome.unwrap_or_else(|| Err(error::closed())),
                    };
                    self.reply(req, result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "redb group commit failed");
                let shown = e.to_string();
                for (req, failure) in batch.into_iter().zip(failed) {
                    let result = Err(failure.unwrap_or_else(|| copy_error(&e, &shown)));
                    self.reply(req, result);
                }
            }
        }
    }

    fn try_commit(
        &mut self,
        batch: &[WriteReq],
        failed: &[Option<Error>],
        sweep: bool,
    ) -> Result<Committed, Abort> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| Abort::Txn(error::from("begin a write transaction", e)))?;
        let (rev, compacted, events, outcomes, next_expiry, next_deadline, dirty) = {
            let tables = Tables::open(&txn).map_err(|f| Abort::Txn(f.into_error("open tables")))?;
            let mut ctx = Ctx {
                t: tables,
                rev: self.rev,
                compacted: self.compacted,
                now: now_ms(),
                events: Vec::new(),
                dirty: false,
                sessions_touched: false,
            };
            if sweep {
                let sessions_due = self.next_deadline.is_some_and(|d| d <= ctx.now);
                ctx.sweep(sessions_due)
                    .map_err(|f| Abort::Txn(f.into_error("sweep expired keys")))?;
            }
            let mut outcomes = Vec::with_capacity(batch.len());
            for (i, req) in batch.iter().enumerate() {
                if failed[i].is_some() {
                    outcomes.push(None);
                    continue;
                }
                match ctx.apply(&req.op) {
                    Ok(o) => outcomes.push(Some(o)),
                    Err(f) => return Err(Abort::Request(i, f.into_error("write"))),
                }
            }
            ctx.finish(self.settings.history)
                .map_err(|f| Abort::Txn(f.into_error("log events")))?;
            let next_expiry = ctx
                .next_expiry(self.next_expiry)
                .map_err(|f| Abort::Txn(f.into_error("read expiries")))?;
            let next_deadline = ctx
                .next_deadline(self.next_deadline)
                .map_err(|f| Abort::Txn(f.into_error("read session deadlines")))?;
            (
                ctx.rev,
                ctx.compacted,
                ctx.events,
                outcomes,
                next_expiry,
                next_deadline,
                ctx.dirty,
            )
        };
        if rev == self.rev && compacted == self.compacted && !dirty {
            // Nothing changed (failed conditions, no-op deletes): no fsync.
            let _ = txn.abort();
        } else {
            txn.commit()
                .map_err(|e| Abort::Txn(error::from("commit", e)))?;
        }
        Ok(Committed {
            rev,
            compacted,
            next_expiry,
            next_deadline,
            events,
            outcomes,
        })
    }
}

struct Committed {
    rev: Revision,
    compacted: Revision,
    next_expiry: Option<u64>,
    next_deadline: Option<u64>,
    events: Vec<Event>,
    outcomes: Vec<Option<Outcome>>,
}

enum Abort {
    /// Request `i` failed; the others may still commit.
    Request(usize, Error),
    /// The transaction itself failed.
    Txn(Error),
}

/// A fresh error of the same kind for each request of a failed batch.
fn copy_error(e: &Error, shown: &str) -> Error {
    match e {
        Error::Unavailable { .. } => Error::Unavailable {
            backend: BACKEND,
            message: shown.to_owned(),
            source: None,
        },
        Error::DataLoss { .. } => Error::DataLoss {
            backend: BACKEND,
            message: shown.to_owned(),
            source: None,
        },
        Error::InvalidArgument { message, .. } => Error::InvalidArgument {
            backend: BACKEND,
            message: message.clone(),
        },
        _ => Error::Backend {
            backend: BACKEND,
            message: shown.to_owned(),
            source: None,
        },
    }
}

/// Creates the tables, checks the format marker, drops stale lock records
/// and ends the sessions of the previous run.
/// Returns (revision, compacted, next expiry).
fn init(db: &Database, history: u64) -> Result<(Revision, Revision, Option<u64>), Failure> {
    let txn = db.begin_write()?;
    let out = {
        let mut meta = txn.open_table(META)?;
        let format = meta.get(META_FORMAT)?.map(|v| v.value());
        match format {
            None => {
                meta.insert(META_FORMAT, FORMAT)?;
            }
            Some(FORMAT) => {}
            Some(other) => {
                return Err(Failure::Kv(Error::InvalidArgument {
                    backend: BACKEND,
                    message: format!(
                        "the file has anykv-redb format {other}; this build reads format {FORMAT}"
                    ),
                }));
            }
        }
        let mut tables = Tables::open(&txn)?;
        // Created now, so that readers never find it missing.
        tables.expiry()?;
        let rev = tables.events.last()?.map_or(0, |(k, _)| k.value());
        let compacted = compacted_floor(&meta, &tables.events, rev)?;
        drop(meta);
        let mut ctx = Ctx {
            t: tables,
            rev,
            compacted,
            now: now_ms(),
            events: Vec::new(),
            dirty: false,
            sessions_touched: false,
        };
        ctx.drop_stale_locks()?;
        // Only one process opens the file: every session recorded in it
        // belonged to a process that is gone.
        ctx.end_sessions(true)?;
        ctx.finish(history)?;
        (ctx.rev, ctx.compacted, ctx.next_expiry(None)?)
    };
    txn.commit()?;
    Ok(out)
}
