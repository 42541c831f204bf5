//! A linearizability checker for concurrent histories of single-key
//! operations (get, conditional put, conditional delete).
//!
//! The fault suite records, for every operation it runs through anykv, which
//! client ran it, when it was invoked and when it returned (monotonic
//! nanoseconds since the run started), and what it returned. [`check`] decides
//! whether some total order of the operations, each taking effect at one
//! instant between its invocation and its return, explains every outcome
//! under the sequential specification of one key below.
//!
//! # The sequential specification of one key
//! - The key is absent when the history starts (workloads use fresh keys), or
//!   present with a value (a `u64` id, unique per write) and a version.
//! - Versions are the server's numbers (etcd `mod_revision`, ZooKeeper
//!   `mzxid`, Consul `ModifyIndex`, a store revision): each write of the key
//!   gets one strictly greater than every version the key had before, even
//!   across a delete, and none is ever reused.
//! - [`Call::Get`] returns the current value and version, or `None`.
//! - [`Call::Put`] writes when its [`Condition`] holds and returns the new
//!   version ([`Outcome::Written`]), otherwise [`Outcome::ConditionFailed`].
//! - [`Call::Delete`] with `Always` returns whether the key existed
//!   ([`Outcome::Deleted`]); with `IfPresent`/`IfVersion` it deletes and
//!   returns `Deleted(true)` when the condition holds, otherwise
//!   `ConditionFailed`, as `Store::delete` does.
//! - An operation whose outcome is unknown ([`Outcome::Unknown`], or no return
//!   time: it timed out or lost its connection) may or may not have taken
//!   effect, at any instant after its invocation. A write that took effect
//!   leaves the version unknown until a later read or a successful
//!   `IfVersion` pins it. A get with an unknown outcome says nothing and is
//!   ignored.
//!
//! # The algorithm
//! Linearizability is compositional, so each key is checked on its own. Per
//! key, two cheap checks first catch the commonest violations with a clear
//! explanation: a read of a value no put wrote, and versions going back in
//! real time (a stale read, a lost acknowledged write, a reused version).
//!
//! Then the search is Wing & Gong's as refined by Lowe ("Testing for
//! linearizability", 2017) and used by porcupine and knossos: walk the
//! history's invocation and return events in time order, linearize any
//! invoked operation whose outcome the model accepts in the current state,
//! backtrack when an operation's return is reached before it was linearized,
//! and never explore the same (set of linearized operations, model state)
//! twice. Four reductions, each keeping the search exact, make it fast on
//! the suite's histories:
//! - a read or failed condition the state accepts is linearized at once,
//!   without branching: moving it earlier never breaks a linearization;
//! - a prefix is not explored when one with the same operations of known
//!   outcome and state, but fewer of unknown outcome, already failed;
//! - an operation of unknown outcome is not followed by one that would leave
//!   the same state without it (an overwrite), nor by a run of them that
//!   comes back to the state before it;
//! - operations of unknown outcome with equal calls (deletes, writes of values
//!   nobody read) are used in the order of their invocations only.
//!
//! The search is exponential in the worst case (many operations of unknown
//! outcome make a violation expensive to prove), so it runs within a time
//! budget and a memory cap and answers [`Verdict::Inconclusive`] when it
//! exceeds either. In debug builds, 2,000 operations of 10 clients on one
//! key take about 0.1 s to judge, with or without a violation.
//!
//! # Example
//! ```
//! use anykv_chaos::linearizability::{check, Call, Condition, Operation, Outcome, Verdict};
//! use std::time::Duration;
//!
//! let put = Operation {
//!     key: "k".into(),
//!     client: 0,
//!     invoke: 0,
//!     ret: Some(10),
//!     call: Call::Put { value: 1, condition: Condition::Always },
//!     outcome: Outcome::Written(5),
//! };
//! let get = Operation {
//!     key: "k".into(),
//!     client: 1,
//!     invoke: 20,
//!     ret: Some(30),
//!     call: Call::Get,
//!     outcome: Outcome::Got(None),
//! };
//! // The get started after the put was acknowledged, so it must see it.
//! let verdict = check(&[put.clone(), get.clone()], Duration::from_secs(1));
//! assert!(matches!(verdict, Verdict::Violation { .. }));
//!
//! let seen = Operation { outcome: Outcome::Got(Some((1, 5))), ..get };
//! assert_eq!(check(&[put, seen], Duration::from_secs(1)), Verdict::Linearizable);
//! ```

use std::{
    collections::{HashMap, HashSet},
    fmt,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// Precondition of a [`Call::Put`] or [`Call::Delete`] (as
/// `anykv::Condition`, with the version as its raw number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Condition {
    /// No precondition.
    Always,
    /// The key must be absent (puts only).
    IfAbsent,
    /// The key must be present.
    IfPresent,
    /// The key must be present at exactly this version.
    IfVersion(u64),
}

/// What an operation asked of the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Call {
    /// Read the value and version.
    Get,
    /// Write `value` (unique per write in the workload) under `condition`.
    Put {
        /// The value written.
        value: u64,
        /// Its precondition.
        condition: Condition,
    },
    /// Delete the key under `condition` (`IfAbsent` is not a valid delete).
    Delete {
        /// Its precondition.
        condition: Condition,
    },
}

/// What an operation returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// A get's answer: `Some((value, version))` or `None` when absent.
    Got(Option<(u64, u64)>),
    /// A put succeeded and the key is now at this version.
    Written(u64),
    /// A delete succeeded; whether the key existed.
    Deleted(bool),
    /// A put's or delete's condition did not hold; nothing was written.
    ConditionFailed,
    /// Timed out or lost its connection: it may or may not have taken effect.
    Unknown,
}

/// One operation of a history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// The key operated on; keys are checked independently.
    pub key: String,
    /// The client (task) that ran it, for the explanation only.
    pub client: usize,
    /// When it was invoked, in monotonic nanoseconds since the run started.
    pub invoke: u64,
    /// When it returned; `None` means the outcome is unknown (as
    /// [`Outcome::Unknown`], whatever `outcome` says) and the operation may
    /// take effect at any time after `invoke`.
    pub ret: Option<u64>,
    /// What it asked.
    pub call: Call,
    /// What it returned.
    pub outcome: Outcome,
}

/// The answer of [`check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every key's history is linearizable.
    Linearizable,
    /// A key's history is not linearizable (or is malformed: an outcome that
    /// does not fit its call, a return before the invocation).
    Violation {
        /// The key.
        key: String,
        /// Human-readable: the longest linearizable prefix the search found,
        /// the state it leads to and the operations that cannot follow it.
        explanation: String,
    },
    /// No violation was found, but the search of this key ran out of its
    /// time budget or memory cap before it could decide.
    Inconclusive {
        /// The first key left undecided.
        key: String,
    },
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Linearizable => f.write_str("linearizable"),
            Verdict::Violation { key, explanation } => {
                write!(f, "not linearizable on key {key:?}: {explanation}")
            }
            Verdict::Inconclusive { key } => {
                write!(
                    f,
                    "inconclusive on key {key:?} (time budget or memory cap exceeded)"
                )
            }
        }
    }
}

/// Checks `history` key by key and returns the first violation found, else
/// the first key it could not decide, else [`Verdict::Linearizable`].
///
/// `budget` bounds the wall-clock time of the whole check (up to one clock
/// read of overshoot). Keys are checked from the fewest operations to the
/// most, each with an equal share of the budget left when its turn comes:
/// small keys take little of theirs, so the largest key gets most of it,
/// and a hard key cannot starve the others.
pub fn check(history: &[Operation], budget: Duration) -> Verdict {
    let start = Instant::now();
    // Positions in `history`, grouped by key in order of first appearance.
    let mut keys: Vec<(&str, Vec<usize>)> = Vec::new();
    let mut slot: HashMap<&str, usize> = HashMap::new();
    for (index, op) in history.iter().enumerate() {
        let at = *slot.entry(op.key.as_str()).or_insert_with(|| {
            keys.push((op.key.as_str(), Vec::new()));
            keys.len() - 1
        });
        keys[at].1.push(index);
    }
    keys.sort_by_key(|(_, ops)| ops.len());
    let mut inconclusive = None;
    let total = keys.len();
    for (done, (key, ops)) in keys.into_iter().enumerate() {
        let left = budget.saturating_sub(start.elapsed());
        // `total - done` is at least 1: `done` < `total`.
        let share = left / u32::try_from(total - done).unwrap_or(u32::MAX);
        match check_key(history, &ops, Instant::now().checked_add(share)) {
            KeyVerdict::Linearizable => {}
            KeyVerdict::Violation(explanation) => {
                return Verdict::Violation {
                    key: key.to_owned(),
                    explanation,
                };
            }
            KeyVerdict::Inconclusive => {
                inconclusive.get_or_insert_with(|| key.to_owned());
            }
        }
    }
    match inconclusive {
        Some(key) => Verdict::Inconclusive { key },
        None => Verdict::Linearizable,
    }
}

/// The verdict on one key.
enum KeyVerdict {
    Linearizable,
    Violation(String),
    Inconclusive,
}

/// The memo holds about this many 64-bit words at most (128 MiB): beyond it
/// the key is inconclusive rather than exhausting the memory of a machine
/// shared with the servers under test.
const MEMO_WORDS: usize = 16 << 20;

/// How many search steps run between two looks at the clock.
const STEPS_PER_CLOCK_READ: u64 = 256;

/// One operation of one key, ready for the search.
#[derive(Clone, Copy)]
struct Op {
    /// Position in the caller's history, for the explanation.
    index: usize,
    client: usize,
    invoke: u64,
    /// `None`: the outcome is unknown and it never has to be linearized.
    ret: Option<u64>,
    call: Call,
    /// `Outcome::Unknown` whenever `ret` is `None`.
    outcome: Outcome,
}

/// The model state of one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct State {
    /// `None` when absent; else the value and its version, `None` while a
    /// write of unknown outcome set it and nothing has observed it yet.
    current: Option<(u64, Option<u64>)>,
    /// The greatest version known to have been assigned so far: every later
    /// write must get a greater one. Whenever `current` has a known version,
    /// it is this one (`versions_going_back` relies on it). Mostly
    /// determined by the linearized set, so it rarely splits memo entries.
    floor: Option<u64>,
}

impl State {
    const INITIAL: State = State {
        current: None,
        floor: None,
    };

    /// Whether `version` may be assigned after everything seen so far.
    fn above_floor(&self, version: u64) -> bool {
        self.floor.is_none_or(|floor| version > floor)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.current {
            None => f.write_str("absent")?,
            Some((value, Some(version))) => write!(f, "value {value} at version {version}")?,
            Some((value, None)) => write!(f, "value {value} at an unknown version")?,
        }
        if let Some(floor) = self.floor {
            write!(f, " (highest version so far {floor})")?;
        }
        Ok(())
    }
}

/// Whether a condition holds in a state.
enum Truth {
    True,
    False,
    /// The state's version is unknown: it holds iff that version is this one.
    IfVersionIs(u64),
}

fn truth(state: &State, condition: Condition) -> Truth {
    let yes = |b: bool| if b { Truth::True } else { Truth::False };
    match (condition, state.current) {
        (Condition::Always, _) => Truth::True,
        (Condition::IfAbsent, current) => yes(current.is_none()),
        (Condition::IfPresent, current) => yes(current.is_some()),
        (Condition::IfVersion(_), None) => Truth::False,
        (Condition::IfVersion(v), Some((_, Some(version)))) => yes(v == version),
        // The unknown version was assigned after `floor`, so a version at or
        // below it cannot be the one.
        (Condition::IfVersion(v), Some((_, None))) if state.above_floor(v) => Truth::IfVersionIs(v),
        (Condition::IfVersion(_), Some((_, None))) => Truth::False,
    }
}

/// Why the model refuses an operation in a state (no allocation: the search
/// asks millions of times; the explanation formats it once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reject {
    /// A get saw something other than the state.
    ReadMismatch,
    /// A version at or below one the key already had.
    StaleVersion(u64),
    /// Reported a success but the condition was false.
    ConditionFalse,
    /// Reported `ConditionFailed` but the condition was true.
    ConditionTrue,
    /// A delete's `existed` disagrees with the state.
    ExistedMismatch,
    /// An unknown-outcome operation would change nothing here.
    NoEffect,
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reject::ReadMismatch => f.write_str("it saw something other than that state"),
            Reject::StaleVersion(v) => {
                write!(f, "version {v} is not above every version the key had")
            }
            Reject::ConditionFalse => f.write_str("it succeeded but its condition was false"),
            Reject::ConditionTrue => f.write_str("its condition failed but was true"),
            Reject::ExistedMismatch => f.write_str("its `existed` disagrees with the state"),
            Reject::NoEffect => f.write_str("with unknown outcome, it would change nothing"),
        }
    }
}

/// The model: the state after `op` takes effect in `state` with its outcome.
///
/// Operations of unknown outcome are only ever linearized where they take
/// effect: taking no effect is the same as never being linearized, which they
/// are allowed.
fn step(state: &State, op: &Op) -> Result<State, Reject> {
    // The floor after a condition is assumed true: an `IfVersionIs` pins the
    // unknown version, which becomes the highest known.
    let floor_if_true = |t: &Truth| match t {
        Truth::True => Ok(state.floor),
        Truth::IfVersionIs(v) => Ok(Some(*v)),
        Truth::False => Err(Reject::ConditionFalse),
    };
    match (op.call, op.outcome) {
        (Call::Get, Outcome::Got(None)) => match state.current {
            None => Ok(*state),
            Some(_) => Err(Reject::ReadMismatch),
        },
        (Call::Get, Outcome::Got(Some((value, version)))) => match state.current {
            Some((v, Some(known))) if v == value && known == version => Ok(*state),
            // The first read of a write of unknown outcome pins its version.
            Some((v, None)) if v == value => {
                if state.above_floor(version) {
                    Ok(State {
                        current: Some((value, Some(version))),
                        floor: Some(version),
                    })
                } else {
                    Err(Reject::StaleVersion(version))
                }
            }
            _ => Err(Reject::ReadMismatch),
        },
        (Call::Put { value, condition }, outcome) => {
            let t = truth(state, condition);
            match outcome {
                Outcome::Written(version) => {
                    let floor = floor_if_true(&t)?;
                    let pinned = State {
                        current: state.current,
                        floor,
                    };
                    if !pinned.above_floor(version) {
                        return Err(Reject::StaleVersion(version));
                    }
                    Ok(State {
                        current: Some((value, Some(version))),
                        floor: Some(version),
                    })
                }
                Outcome::ConditionFailed => match t {
                    Truth::True => Err(Reject::ConditionTrue),
                    Truth::False | Truth::IfVersionIs(_) => Ok(*state),
                },
                Outcome::Unknown => {
                    let floor = floor_if_true(&t).map_err(|_| Reject::NoEffect)?;
                    Ok(State {
                        current: Some((value, None)),
                        floor,
                    })
                }
                Outcome::Got(_) | Outcome::Deleted(_) => Err(Reject::ReadMismatch),
            }
        }
        (Call::Delete { condition }, outcome) => {
            let t = truth(state, condition);
            match outcome {
                Outcome::Deleted(existed) => {
                    let floor = floor_if_true(&t)?;
                    if existed != state.current.is_some() {
                        return Err(Reject::ExistedMismatch);
                    }
                    Ok(State {
                        current: None,
                        floor,
                    })
                }
                Outcome::ConditionFailed => match t {
                    Truth::True => Err(Reject::ConditionTrue),
                    Truth::False | Truth::IfVersionIs(_) => Ok(*state),
                },
                Outcome::Unknown => {
                    let floor = floor_if_true(&t).map_err(|_| Reject::NoEffect)?;
                    if state.current.is_none() {
                        return Err(Reject::NoEffect);
                    }
                    Ok(State {
                        current: None,
                        floor,
                    })
                }
                Outcome::Got(_) | Outcome::Written(_) => Err(Reject::ReadMismatch),
            }
        }
        (Call::Get, _) => Err(Reject::ReadMismatch),
    }
}

/// Checks one key's operations (`ops` are positions in `history`).
fn check_key(history: &[Operation], ops: &[usize], deadline: Option<Instant>) -> KeyVerdict {
    let ops = match prepare(history, ops) {
        Ok(ops) => ops,
        Err(explanation) => return KeyVerdict::Violation(explanation),
    };
    if let Some(explanation) = impossible_reads(&ops).or_else(|| versions_going_back(&ops)) {
        return KeyVerdict::Violation(explanation);
    }
    match Search::new(&interchangeable(&ops)).run(deadline) {
        Ok(()) => KeyVerdict::Linearizable,
        Err(SearchEnd::Exhausted { longest }) => KeyVerdict::Violation(explain(&ops, &longest)),
        Err(SearchEnd::OutOfBudget) => KeyVerdict::Inconclusive,
    }
}

/// Validates the operations and normalizes unknown outcomes; drops gets of
/// unknown outcome (they constrain nothing). Sorted by invocation.
fn prepare(history: &[Operation], ops: &[usize]) -> Result<Vec<Op>, String> {
    let mut out = Vec::with_capacity(ops.len());
    for &index in ops {
        let op = &history[index];
        let pending = op.ret.is_none() || op.outcome == Outcome::Unknown;
        let fits = matches!(
            (op.call, op.outcome),
            (_, Outcome::Unknown)
                | (Call::Get, Outcome::Got(_))
                | (
                    Call::Put { .. },
                    Outcome::Written(_) | Outcome::ConditionFailed
                )
                | (
                    Call::Delete { .. },
                    Outcome::Deleted(_) | Outcome::ConditionFailed
                )
        ) || pending;
        let bad_delete = matches!(
            op.call,
            Call::Delete {
                condition: Condition::IfAbsent
            }
        );
        let backwards = op.ret.is_some_and(|ret| ret < op.invoke);
        if !fits || bad_delete || backwards {
            return Err(format!(
                "malformed operation #{index}: {:?} returning {:?}, invoked at {} and \
                 returned at {}",
                op.call,
                op.outcome,
                seconds(op.invoke),
                op.ret.map_or_else(|| "never".to_owned(), seconds)
            ));
        }
        if pending && op.call == Call::Get {
            continue;
        }
        out.push(Op {
            index,
            client: op.client,
            invoke: op.invoke,
            ret: if pending { None } else { op.ret },
            call: op.call,
            outcome: if pending {
                Outcome::Unknown
            } else {
                op.outcome
            },
        });
    }
    out.sort_by_key(|op| (op.invoke, op.index));
    Ok(out)
}

/// Cheap checks before the search, for a clear explanation of the commonest
/// bugs: a read of a value no put wrote, or at a version other than the one
/// its (only) put reported.
fn impossible_reads(ops: &[Op]) -> Option<String> {
    // value -> Some(version) if written once with a known version, None if
    // written with an unknown outcome or more than once.
    let mut written: HashMap<u64, Option<u64>> = HashMap::new();
    for op in ops {
        if let Call::Put { value, .. } = op.call {
            let version = match op.outcome {
                Outcome::Written(v) => Some(v),
                Outcome::ConditionFailed => continue,
                _ => None,
            };
            written
                .entry(value)
                .and_modify(|known| *known = None)
                .or_insert(version);
        }
    }
    for op in ops {
        if let Outcome::Got(Some((value, version))) = op.outcome {
            match written.get(&value) {
                None => {
                    return Some(format!(
                        "{} read value {value}, which no put of this key wrote \
                         (or every put of it failed its condition)",
                        describe(op)
                    ));
                }
                Some(Some(v)) if *v != version => {
                    return Some(format!(
                        "{} read value {value} at version {version}, but its put \
                         reported version {v}",
                        describe(op)
                    ));
                }
                Some(_) => {}
            }
        }
    }
    None
}

/// The version an operation of known outcome saw or was given, if any.
fn version_of(op: &Op) -> Option<u64> {
    match op.outcome {
        Outcome::Written(version) | Outcome::Got(Some((_, version))) => Some(version),
        _ => None,
    }
}

/// A check before the search that finds the commonest violations (a stale
/// read, a lost acknowledged write, a reused version) in O(n log n), however
/// many operations have unknown outcomes (which can make the search
/// inconclusive): versions never go back in real time.
///
/// In the model, whenever the key's version is known it is the highest
/// version assigned so far, and that only grows. So an operation must see a
/// version at least (a write: be given one above) every version seen or
/// given by an operation that returned before it was invoked.
fn versions_going_back(ops: &[Op]) -> Option<String> {
    // (return, version, operation), by return; then the running maximum.
    let mut done: Vec<(u64, u64, usize)> = ops
        .iter()
        .enumerate()
        .filter_map(|(i, op)| Some((op.ret?, version_of(op)?, i)))
        .collect();
    done.sort_unstable();
    let mut highest: Vec<(u64, usize)> = Vec::with_capacity(done.len());
    for &(_, version, i) in &done {
        let best = match highest.last() {
            Some(&(top, j)) if top >= version => (top, j),
            _ => (version, i),
        };
        highest.push(best);
    }
    for op in ops {
        let Some(version) = version_of(op) else {
            continue;
        };
        let before = done.partition_point(|&(ret, _, _)| ret < op.invoke);
        let Some(&(top, j)) = before.checked_sub(1).and_then(|b| highest.get(b)) else {
            continue;
        };
        let write = matches!(op.outcome, Outcome::Written(_));
        if top > version || (write && top == version) {
            let (what, relation) = if write {
                ("was given", "not above")
            } else {
                ("saw", "below")
            };
            return Some(format!(
                "versions went back in real time:\n  {}\nreturned before\n  {}\nwas \
                 invoked, yet the latter {what} version {version}, {relation} version {top}",
                describe(&ops[j]),
                describe(op)
            ));
        }
    }
    None
}

/// The operations with every write of unknown outcome whose value no read
/// saw rewritten to write one value that no read saw: such writes differ
/// only in their values, which nothing observes, and once their calls are
/// equal the search treats them as interchangeable (see `Search::class`).
fn interchangeable(ops: &[Op]) -> Vec<Op> {
    let read: HashSet<u64> = ops
        .iter()
        .filter_map(|op| match op.outcome {
            Outcome::Got(Some((value, _))) => Some(value),
            _ => None,
        })
        .collect();
    // At most `read.len()` values are taken, so this finds a free one.
    let unseen = (0..=u64::MAX)
        .rev()
        .find(|v| !read.contains(v))
        .unwrap_or(u64::MAX);
    ops.iter()
        .map(|op| match op.call {
            Call::Put { value, condition }
                if op.outcome == Outcome::Unknown && !read.contains(&value) =>
            {
                Op {
                    call: Call::Put {
                        value: unseen,
                        condition,
                    },
                    ..*op
                }
            }
            _ => *op,
        })
        .collect()
}

/// Why the search stopped without a linearization.
enum SearchEnd {
    /// Every order was tried; `longest` is the longest linearizable prefix
    /// found (operation positions, in order).
    Exhausted {
        longest: Vec<usize>,
    },
    OutOfBudget,
}

/// Marks the end of the event list.
const NIL: usize = usize::MAX;
/// The list's sentinel node; event `e` is node `e + 1`.
const HEAD: usize = 0;

/// Lowe's just-in-time linearization search over a doubly linked list of
/// invocation and return events, with operations lifted out of it as they
/// are linearized and put back on backtracking.
struct Search<'a> {
    ops: &'a [Op],
    /// Per node: (operation, is its invocation). Node `HEAD` is unused.
    node_op: Vec<(usize, bool)>,
    next: Vec<usize>,
    prev: Vec<usize>,
    call_node: Vec<usize>,
    ret_node: Vec<Option<usize>>,
    /// Per operation: whether, once the model accepts it without changing
    /// the state, it would do so at any later point too (a failed
    /// condition, a read; not a read that may pin a version later).
    pure: Vec<bool>,
    /// Per operation: its bit in the set of linearized operations of its
    /// kind (known or unknown outcome).
    rank: Vec<usize>,
    known_count: usize,
    unknown_count: usize,
    /// Per operation of unknown outcome: its class of interchangeable
    /// operations (equal calls) and its position in that class, by
    /// invocation. Any linearization can use a class's operations in that
    /// order (swapping two equal calls where the later-invoked one is used
    /// first keeps it valid), so the search only takes the class's first
    /// unused one: without this, which of ten identical timed-out deletes
    /// explains an absence multiplies the prefixes to explore tenfold.
    class: Vec<(usize, usize)>,
    /// Per class: how many of its operations the current prefix holds.
    used: Vec<usize>,
}

impl<'a> Search<'a> {
    fn new(ops: &'a [Op]) -> Self {
        // Events in time order; at equal times invocations first, so that two
        // operations touching at an instant count as concurrent (the order
        // that can only accept more histories, never invent a violation).
        let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
        for (i, op) in ops.iter().enumerate() {
            events.push((op.invoke, false, i));
            if let Some(ret) = op.ret {
                events.push((ret, true, i));
            }
        }
        events.sort_unstable();
        let nodes = events.len() + 1;
        let mut node_op = vec![(usize::MAX, false); nodes];
        let mut call_node = vec![NIL; ops.len()];
        let mut ret_node = vec![None; ops.len()];
        for (e, &(_, is_ret, op)) in events.iter().enumerate() {
            node_op[e + 1] = (op, !is_ret);
            if is_ret {
                ret_node[op] = Some(e + 1);
            } else {
                call_node[op] = e + 1;
            }
        }
        let next = (0..nodes)
            .map(|n| if n + 1 < nodes { n + 1 } else { NIL })
            .collect();
        let prev = (0..nodes).map(|n| n.saturating_sub(1)).collect();
        // How many puts may have written each value (unique in workloads).
        let mut writers: HashMap<u64, usize> = HashMap::new();
        for op in ops {
            if let (Call::Put { value, .. }, Outcome::Written(_) | Outcome::Unknown) =
                (op.call, op.outcome)
            {
                *writers.entry(value).or_default() += 1;
            }
        }
        let pure = ops
            .iter()
            .map(|op| match op.outcome {
                Outcome::ConditionFailed | Outcome::Got(None) | Outcome::Deleted(false) => true,
                // Once a read saw its value at a known version, the state can
                // hold that value at an unknown version again only through a
                // second write of it: with one writer the read stays pure.
                Outcome::Got(Some((value, _))) => writers.get(&value).is_none_or(|&n| n <= 1),
                Outcome::Written(_) | Outcome::Deleted(true) | Outcome::Unknown => false,
            })
            .collect();
        let (mut known_count, mut unknown_count) = (0, 0);
        let rank = ops
            .iter()
            .map(|op| {
                let count = if op.ret.is_some() {
                    &mut known_count
                } else {
                    &mut unknown_count
                };
                *count += 1;
                *count - 1
            })
            .collect();
        let mut classes: HashMap<Call, (usize, usize)> = HashMap::new();
        let class = ops
            .iter()
            .map(|op| {
                if op.ret.is_some() {
                    return (usize::MAX, 0);
                }
                let fresh = classes.len();
                let (id, size) = classes.entry(op.call).or_insert((fresh, 0));
                *size += 1;
                (*id, *size - 1)
            })
            .collect();
        Search {
            ops,
            node_op,
            next,
            prev,
            call_node,
            ret_node,
            pure,
            rank,
            known_count,
            unknown_count,
            class,
            used: vec![0; classes.len()],
        }
    }

    fn unlink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    /// Undoes `unlink(node)`; must run in the reverse order of the unlinks.
    fn relink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = node;
        if n != NIL {
            self.prev[n] = node;
        }
    }

    fn lift(&mut self, op: usize) {
        if self.pending(op) {
            self.used[self.class[op].0] += 1;
        }
        self.unlink(self.call_node[op]);
        if let Some(r) = self.ret_node[op] {
            self.unlink(r);
        }
    }

    fn unlift(&mut self, op: usize) {
        if self.pending(op) {
            self.used[self.class[op].0] -= 1;
        }
        if let Some(r) = self.ret_node[op] {
            self.relink(r);
        }
        self.relink(self.call_node[op]);
    }

    fn pending(&self, op: usize) -> bool {
        self.ops[op].ret.is_none()
    }

    /// An invoked operation that must not wait for any other (no return
    /// precedes its invocation in the list) and that the model accepts
    /// without changing `state`, if any.
    fn pure_candidate(&self, state: &State) -> Option<usize> {
        let mut cursor = self.next[HEAD];
        while cursor != NIL {
            let (op, is_call) = self.node_op[cursor];
            if !is_call {
                break;
            }
            if self.pure[op] && step(state, &self.ops[op]) == Ok(*state) {
                return Some(op);
            }
            cursor = self.next[cursor];
        }
        None
    }

    fn run(mut self, deadline: Option<Instant>) -> Result<(), SearchEnd> {
        let mut linearized = Linearized {
            known: vec![0; self.known_count.div_ceil(64)],
            unknown: vec![0; self.unknown_count.div_ceil(64)],
        };
        let mut memo = Memo::default();
        let mut stack: Vec<Frame> = Vec::new();
        let mut longest: Vec<usize> = Vec::new();
        let mut state = State::INITIAL;
        let mut must = self.known_count;
        // The scan of the current prefix's candidates: operations of known
        // outcome first, then (`second_pass`) those of unknown outcome, so
        // that a prefix is explored without an optional write before with
        // it, and the memo can discard the second when the first failed.
        let mut cursor = self.next[HEAD];
        let mut second_pass = false;
        // Whether the search just reached this prefix (and has not yet
        // looked for a pure operation to take greedily).
        let mut fresh = true;
        let mut steps: u64 = 0;
        loop {
            if must == 0 {
                return Ok(());
            }
            steps += 1;
            if steps.is_multiple_of(STEPS_PER_CLOCK_READ)
                && (deadline.is_some_and(|d| Instant::now() >= d) || memo.words > MEMO_WORDS)
            {
                return Err(SearchEnd::OutOfBudget);
            }
            // The choice to take next: (operation, state after, forced).
            let mut choice = None;
            if fresh {
                fresh = false;
                // A pure operation the state accepts can take effect right
                // now in any linearization extending this prefix (moving it
                // earlier breaks no real-time order: nothing that returned
                // before its invocation is left, and it changes nothing for
                // the others), so it is the only branch worth exploring: if
                // it fails, the whole prefix fails.
                if let Some(op) = self.pure_candidate(&state) {
                    choice = Some((op, state, true));
                }
            }
            if choice.is_none() {
                if cursor != NIL && self.node_op[cursor].1 {
                    let op = self.node_op[cursor].0;
                    cursor = self.next[cursor];
                    if self.pending(op) != second_pass
                        || (second_pass && self.class[op].1 != self.used[self.class[op].0])
                    {
                        continue;
                    }
                    let Ok(after) = step(&state, &self.ops[op]) else {
                        continue;
                    };
                    // Right after an optional write, an operation that would
                    // leave the same state without it (an overwrite) makes
                    // that write pointless: its sibling prefix without the
                    // write reaches the same state with more options left.
                    if let Some(last) = stack.last().filter(|last| self.pending(last.op))
                        && step(&last.before, &self.ops[op]) == Ok(after)
                    {
                        continue;
                    }
                    // A run of optional operations that brings the state
                    // back to where the run started achieved nothing but
                    // using them up: the prefix before the run does better.
                    if self.pending(op)
                        && stack
                            .iter()
                            .rev()
                            .take_while(|frame| self.pending(frame.op))
                            .any(|frame| frame.before == after)
                    {
                        continue;
                    }
                    choice = Some((op, after, false));
                } else if !second_pass {
                    second_pass = true;
                    cursor = self.next[HEAD];
                    continue;
                }
            }
            if let Some((op, after, forced)) = choice {
                linearized.mark(&self, op, true);
                if memo.enter(&linearized, &after) {
                    stack.push(Frame {
                        op,
                        before: state,
                        forced,
                    });
                    if stack.len() > longest.len() {
                        longest = stack.iter().map(|frame| frame.op).collect();
                    }
                    state = after;
                    self.lift(op);
                    if !self.pending(op) {
                        must -= 1;
                    }
                    cursor = self.next[HEAD];
                    second_pass = false;
                    fresh = true;
                    continue;
                }
                // Explored before, from another order of the same operations,
                // or no better than a prefix that failed.
                linearized.mark(&self, op, false);
                if !forced {
                    continue;
                }
            }
            // An operation returned before it could be linearized, the
            // candidates ran out, or a forced choice failed: undo choices up
            // to the last free one and try the candidate after it.
            loop {
                let Some(frame) = stack.pop() else {
                    return Err(SearchEnd::Exhausted { longest });
                };
                memo.fail(&linearized, &state);
                linearized.mark(&self, frame.op, false);
                state = frame.before;
                self.unlift(frame.op);
                if !self.pending(frame.op) {
                    must += 1;
                }
                if !frame.forced {
                    cursor = self.next[self.call_node[frame.op]];
                    second_pass = self.pending(frame.op);
                    break;
                }
            }
        }
    }
}

/// One linearized operation on the search stack.
struct Frame {
    op: usize,
    /// The state before it, restored on backtracking.
    before: State,
    /// Taken as the only branch worth exploring (a pure operation): when it
    /// fails, the prefix before it fails too.
    forced: bool,
}

/// The operations of a prefix, as two bitsets: those of known outcome (every
/// one must be linearized) and those of unknown outcome (optional).
struct Linearized {
    known: Vec<u64>,
    unknown: Vec<u64>,
}

impl Linearized {
    fn mark(&mut self, search: &Search<'_>, op: usize, on: bool) {
        let bits = if search.pending(op) {
            &mut self.unknown
        } else {
            &mut self.known
        };
        let i = search.rank[op];
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if on {
            bits[word] |= bit;
        } else {
            bits[word] &= !bit;
        }
    }
}

/// The prefixes explored: per (operations of known outcome, state), the sets
/// of operations of unknown outcome seen with them.
///
/// Besides the exact repeats of WGL's memo, it discards a prefix that has the
/// same known operations and state as one that failed with a subset of its
/// unknown ones: whatever completes the larger prefix completes the smaller
/// one too (leaving the extra optional writes out), so it fails as well.
/// Without this, each write of unknown outcome doubles the work on a
/// history with a violation.
#[derive(Default)]
struct Memo {
    seen: HashMap<Box<[u64]>, Vec<Seen>, FastHash>,
    /// The key scratch buffer: the known bitset then the state's words.
    key: Vec<u64>,
    /// Words held, for the memory cap.
    words: usize,
}

struct Seen {
    unknown: Box<[u64]>,
    /// Explored to the end without a linearization (else: on the stack).
    failed: bool,
}

impl Memo {
    fn fill_key(&mut self, linearized: &Linearized, state: &State) {
        self.key.clear();
        self.key.extend_from_slice(&linearized.known);
        let (value, version) = state.current.unwrap_or((0, None));
        let tag = u64::from(state.current.is_some())
            | u64::from(version.is_some()) << 1
            | u64::from(state.floor.is_some()) << 2;
        self.key
            .extend_from_slice(&[tag, value, version.unwrap_or(0), state.floor.unwrap_or(0)]);
    }

    /// Records a prefix about to be explored; false if it need not be.
    fn enter(&mut self, linearized: &Linearized, state: &State) -> bool {
        self.fill_key(linearized, state);
        let unknown = &linearized.unknown[..];
        if !self.seen.contains_key(&self.key[..]) {
            self.words += self.key.len();
            self.seen
                .insert(self.key.clone().into_boxed_slice(), Vec::new());
        }
        let Some(seen) = self.seen.get_mut(&self.key[..]) else {
            return true;
        };
        let subset = |small: &[u64]| small.iter().zip(unknown).all(|(s, u)| s & !u == 0);
        if seen
            .iter()
            .any(|s| &s.unknown[..] == unknown || (s.failed && subset(&s.unknown)))
        {
            return false;
        }
        self.words += unknown.len() + 2;
        seen.push(Seen {
            unknown: unknown.into(),
            failed: false,
        });
        true
    }

    /// Marks an entered prefix as explored without success.
    fn fail(&mut self, linearized: &Linearized, state: &State) {
        self.fill_key(linearized, state);
        let unknown = &linearized.unknown[..];
        if let Some(seen) = self.seen.get_mut(&self.key[..]) {
            for s in seen.iter_mut().filter(|s| &s.unknown[..] == unknown) {
                s.failed = true;
            }
        }
    }
}

/// A fast non-cryptographic hasher for the memo (FxHash's multiply-rotate):
/// its keys are bitsets and states, not attacker-controlled input, and the
/// default SipHash dominates the search's time on long histories.
#[derive(Default)]
struct Fx(u64);

impl std::hash::Hasher for Fx {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }
}

type FastHash = std::hash::BuildHasherDefault<Fx>;

/// How many operations of the longest prefix the explanation shows.
const SHOWN_PREFIX: usize = 8;
/// How many candidate operations the explanation shows.
const SHOWN_CANDIDATES: usize = 8;

/// Explains a violation from the longest linearizable prefix: the state it
/// leads to, the operation that returned before it could be linearized after
/// it, and why no operation invoked by then can come next.
fn explain(ops: &[Op], longest: &[usize]) -> String {
    let mut state = State::INITIAL;
    for &op in longest {
        // The search accepted each of these in this order.
        state = step(&state, &ops[op]).unwrap_or(state);
    }
    let mut done = vec![false; ops.len()];
    for &op in longest {
        done[op] = true;
    }
    let unknown = ops.iter().filter(|op| op.ret.is_none()).count();
    let mut text = format!(
        "no linearization of its {} operations ({unknown} of unknown outcome); \
         the longest linearizable prefix found orders {} of them",
        ops.len(),
        longest.len()
    );
    let skipped = longest.len().saturating_sub(SHOWN_PREFIX);
    if skipped > 0 {
        text.push_str(&format!(", ending (after {skipped} more):"));
    } else if !longest.is_empty() {
        text.push(':');
    }
    for &op in &longest[skipped..] {
        text.push_str(&format!("\n  {}", describe(&ops[op])));
    }
    text.push_str(&format!("\nwhich leaves the key {state}."));
    let blocking = (0..ops.len())
        .filter(|&i| !done[i])
        .filter_map(|i| ops[i].ret.map(|ret| (ret, i)))
        .min();
    let Some((deadline, blocking)) = blocking else {
        return text;
    };
    text.push_str(&format!(
        "\nThe next operation to return must take effect after that prefix:\n  {}",
        describe(&ops[blocking])
    ));
    text.push_str("\nbut none of the operations invoked by then can come next:");
    // Those of known outcome first: they must take effect somewhere.
    let mut candidates: Vec<usize> = (0..ops.len())
        .filter(|&i| !done[i] && ops[i].invoke <= deadline)
        .collect();
    candidates.sort_by_key(|&i| (ops[i].ret.is_none(), ops[i].invoke));
    for &i in candidates.iter().take(SHOWN_CANDIDATES) {
        let why = match step(&state, &ops[i]) {
            Err(reject) => reject.to_string(),
            Ok(_) => "only leads to dead ends".to_owned(),
        };
        text.push_str(&format!("\n  {}: {why}", describe(&ops[i])));
    }
    if candidates.len() > SHOWN_CANDIDATES {
        text.push_str(&format!(
            "\n  ({} more)",
            candidates.len() - SHOWN_CANDIDATES
        ));
    }
    text
}

/// One line per operation: `#index client c [invoke, return] call -> outcome`.
fn describe(op: &Op) -> String {
    let call = match op.call {
        Call::Get => "get".to_owned(),
        Call::Put { value, condition } => format!("put {value}{}", condition_text(condition)),
        Call::Delete { condition } => format!("delete{}", condition_text(condition)),
    };
    let outcome = match op.outcome {
        Outcome::Got(None) => "absent".to_owned(),
        Outcome::Got(Some((value, version))) => format!("value {value} at version {version}"),
        Outcome::Written(version) => format!("written at version {version}"),
        Outcome::Deleted(existed) => format!("deleted (existed: {existed})"),
        Outcome::ConditionFailed => "condition failed".to_owned(),
        Outcome::Unknown => "unknown".to_owned(),
    };
    let ret = op.ret.map_or_else(|| "never".to_owned(), seconds);
    format!(
        "#{} client {} [{}, {}] {call} -> {outcome}",
        op.index,
        op.client,
        seconds(op.invoke),
        ret
    )
}

fn condition_text(condition: Condition) -> String {
    match condition {
        Condition::Always => String::new(),
        Condition::IfAbsent => " if absent".to_owned(),
        Condition::IfPresent => " if present".to_owned(),
        Condition::IfVersion(v) => format!(" if version {v}"),
    }
}

/// Nanoseconds as seconds with microsecond precision.
fn seconds(nanos: u64) -> String {
    format!(
        "{}.{:06}s",
        nanos / 1_000_000_000,
        nanos % 1_000_000_000 / 1_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Generous for the small histories: they take microseconds.
    const BUDGET: Duration = Duration::from_secs(10);

    fn op(client: usize, invoke: u64, ret: Option<u64>, call: Call, outcome: Outcome) -> Operation {
        Operation {
            key: "k".to_owned(),
            client,
            invoke,
            ret,
            call,
            outcome,
        }
    }

    fn get(client: usize, invoke: u64, ret: u64, got: Option<(u64, u64)>) -> Operation {
        op(client, invoke, Some(ret), Call::Get, Outcome::Got(got))
    }

    fn put(
        client: usize,
        invoke: u64,
        ret: u64,
        value: u64,
        c: Condition,
        o: Outcome,
    ) -> Operation {
        let call = Call::Put {
            value,
            condition: c,
        };
        op(client, invoke, Some(ret), call, o)
    }

    /// An unconditional put that returned `version`.
    fn write(client: usize, invoke: u64, ret: u64, value: u64, version: u64) -> Operation {
        put(
            client,
            invoke,
            ret,
            value,
            Condition::Always,
            Outcome::Written(version),
        )
    }

    /// A put whose outcome is unknown (no return).
    fn lost_put(client: usize, invoke: u64, value: u64) -> Operation {
        let call = Call::Put {
            value,
            condition: Condition::Always,
        };
        op(client, invoke, None, call, Outcome::Unknown)
    }

    fn del(client: usize, invoke: u64, ret: u64, c: Condition, o: Outcome) -> Operation {
        op(client, invoke, Some(ret), Call::Delete { condition: c }, o)
    }

    #[track_caller]
    fn assert_linearizable(history: &[Operation]) {
        let verdict = check(history, BUDGET);
        assert_eq!(verdict, Verdict::Linearizable, "{verdict}");
    }

    #[track_caller]
    fn assert_violation(history: &[Operation]) -> String {
        match check(history, BUDGET) {
            Verdict::Violation { explanation, .. } => explanation,
            other => panic!("expected a violation, got {other}"),
        }
    }

    #[test]
    fn the_module_example_holds() {
        let put = write(0, 0, 10, 1, 5);
        assert_violation(&[put.clone(), get(1, 20, 30, None)]);
        assert_linearizable(&[put, get(1, 20, 30, Some((1, 5)))]);
    }

    #[test]
    fn empty_history_is_linearizable() {
        assert_linearizable(&[]);
    }

    #[test]
    fn sequential_history_following_the_spec_is_linearizable() {
        use Condition::*;
        assert_linearizable(&[
            get(0, 0, 1, None),
            put(0, 10, 11, 1, IfPresent, Outcome::ConditionFailed),
            put(0, 20, 21, 1, IfVersion(3), Outcome::ConditionFailed),
            put(0, 30, 31, 1, IfAbsent, Outcome::Written(5)),
            get(0, 40, 41, Some((1, 5))),
            put(0, 50, 51, 2, IfVersion(5), Outcome::Written(7)),
            put(0, 60, 61, 3, IfAbsent, Outcome::ConditionFailed),
            put(0, 70, 71, 4, IfVersion(5), Outcome::ConditionFailed),
            del(0, 80, 81, IfVersion(5), Outcome::ConditionFailed),
            put(0, 90, 91, 5, IfPresent, Outcome::Written(8)),
            del(0, 100, 101, IfVersion(8), Outcome::Deleted(true)),
            get(0, 110, 111, None),
            del(0, 120, 121, Always, Outcome::Deleted(false)),
            del(0, 130, 131, IfPresent, Outcome::ConditionFailed),
            put(0, 140, 141, 6, IfAbsent, Outcome::Written(9)),
            del(0, 150, 151, Always, Outcome::Deleted(true)),
        ]);
    }

    #[test]
    fn sequential_histories_breaking_the_spec_are_violations() {
        use Condition::*;
        // A read missing the acknowledged write.
        assert_violation(&[write(0, 0, 1, 1, 5), get(0, 2, 3, None)]);
        // A delete that says the key did not exist.
        assert_violation(&[
            write(0, 0, 1, 1, 5),
            del(0, 2, 3, Always, Outcome::Deleted(false)),
        ]);
        // A delete that says an absent key existed.
        assert_violation(&[del(0, 0, 1, Always, Outcome::Deleted(true))]);
        // A versioned delete of an absent key.
        assert_violation(&[del(0, 0, 1, IfVersion(3), Outcome::Deleted(true))]);
        // A read after a delete still seeing the value.
        assert_violation(&[
            write(0, 0, 1, 1, 5),
            del(0, 2, 3, Always, Outcome::Deleted(true)),
            get(0, 4, 5, Some((1, 5))),
        ]);
        // A read at the right value but the wrong version.
        assert_violation(&[write(0, 0, 1, 1, 5), get(0, 2, 3, Some((1, 6)))]);
    }

    #[test]
    fn overlapping_writes_linearize_in_either_order() {
        // Versions order the writes: whichever got the higher one came last
        // and a later read sees it; a read during both may see either.
        for (a_version, b_version, last) in [(5, 6, (2, 6)), (6, 5, (1, 6))] {
            assert_linearizable(&[
                write(0, 0, 100, 1, a_version),
                write(1, 10, 90, 2, b_version),
                get(2, 20, 30, Some((1, a_version))),
                get(3, 20, 30, Some((2, b_version))),
                get(2, 110, 120, Some(last)),
            ]);
        }
        // Without versions to order them (both of unknown outcome), a later
        // read may see either one.
        for seen in [1, 2] {
            assert_linearizable(&[
                lost_put(0, 0, 1),
                lost_put(1, 10, 2),
                get(2, 200, 210, Some((seen, 9))),
            ]);
        }
        // Two creates racing: one wins, the other's condition fails.
        assert_linearizable(&[
            put(0, 0, 100, 1, Condition::IfAbsent, Outcome::ConditionFailed),
            put(1, 10, 90, 2, Condition::IfAbsent, Outcome::Written(4)),
            get(2, 110, 120, Some((2, 4))),
        ]);
    }

    #[test]
    fn overlapping_writes_seen_against_their_version_order_are_a_violation() {
        // Version 6 was written after version 5, so once both returned the
        // key cannot hold version 5.
        assert_violation(&[
            write(0, 0, 100, 1, 5),
            write(1, 10, 90, 2, 6),
            get(2, 110, 120, Some((1, 5))),
        ]);
    }

    #[test]
    fn stale_read_after_a_completed_write_is_a_violation() {
        let explanation = assert_violation(&[
            write(0, 0, 10, 1, 5),
            write(0, 20, 30, 2, 6),
            get(1, 40, 50, Some((1, 5))),
        ]);
        assert!(explanation.contains("went back"), "{explanation}");
        assert!(explanation.contains("#2 client 1"), "{explanation}");
    }

    #[test]
    fn explanation_names_the_prefix_and_the_stuck_operation() {
        let explanation = assert_violation(&[
            write(0, 0, 10, 1, 5),
            get(1, 20, 30, Some((1, 5))),
            del(0, 40, 50, Condition::Always, Outcome::Deleted(true)),
            get(1, 60, 70, Some((1, 5))),
        ]);
        for part in [
            "longest linearizable prefix found orders 3",
            "leaves the key absent (highest version so far 5)",
            "must take effect after that prefix:\n  #3 client 1",
            "#3 client 1 [0.000000s, 0.000000s] get -> value 1 at version 5: it saw something other",
        ] {
            assert!(explanation.contains(part), "{part:?} in {explanation}");
        }
    }

    #[test]
    fn reads_going_back_in_time_are_a_violation() {
        // The write is still in flight, but once a read saw it a later read
        // cannot see the previous value.
        assert_violation(&[
            write(0, 0, 10, 1, 5),
            write(0, 20, 200, 2, 6),
            get(1, 30, 40, Some((2, 6))),
            get(2, 50, 60, Some((1, 5))),
        ]);
        // The same reads the other way round are fine.
        assert_linearizable(&[
            write(0, 0, 10, 1, 5),
            write(0, 20, 200, 2, 6),
            get(1, 30, 40, Some((1, 5))),
            get(2, 50, 60, Some((2, 6))),
        ]);
    }

    #[test]
    fn read_of_a_value_never_written_is_a_violation() {
        let explanation = assert_violation(&[write(0, 0, 10, 1, 5), get(1, 5, 50, Some((42, 5)))]);
        assert!(explanation.contains("no put"), "{explanation}");
        // A value only written by a put whose condition failed counts too.
        assert_violation(&[
            put(0, 0, 10, 1, Condition::IfPresent, Outcome::ConditionFailed),
            get(1, 5, 50, Some((1, 5))),
        ]);
    }

    #[test]
    fn lost_acknowledged_write_is_a_violation() {
        // Acknowledged, then gone: the key reads as before the write, and
        // nobody wrote after it.
        assert_violation(&[
            write(0, 0, 10, 1, 5),
            write(1, 20, 30, 2, 6),
            get(2, 40, 50, Some((2, 6))),
            get(2, 1_000, 1_010, Some((1, 5))),
        ]);
        assert_violation(&[write(1, 20, 30, 2, 6), get(2, 1_000, 1_010, None)]);
    }

    #[test]
    fn unknown_outcome_write_that_took_effect_is_linearizable() {
        assert_linearizable(&[
            write(0, 0, 10, 1, 5),
            lost_put(0, 20, 2),
            get(1, 30, 40, Some((2, 8))),
            put(1, 50, 60, 3, Condition::IfVersion(8), Outcome::Written(9)),
            get(1, 70, 80, Some((3, 9))),
        ]);
        // It may take effect long after it was invoked, after reads that
        // did not see it yet.
        assert_linearizable(&[
            write(0, 0, 10, 1, 5),
            lost_put(0, 20, 2),
            get(1, 30, 40, Some((1, 5))),
            get(1, 5_000, 5_010, Some((2, 8))),
        ]);
        // An `Unknown` outcome with a return time is just as unknown.
        assert_linearizable(&[
            op(
                0,
                0,
                Some(10),
                Call::Delete {
                    condition: Condition::Always,
                },
                Outcome::Unknown,
            ),
            write(0, 20, 30, 1, 5),
        ]);
    }

    #[test]
    fn unknown_outcome_write_that_did_not_take_effect_is_linearizable() {
        assert_linearizable(&[
            write(0, 0, 10, 1, 5),
            lost_put(0, 20, 2),
            get(1, 30, 40, Some((1, 5))),
            get(1, 5_000, 5_010, Some((1, 5))),
            del(
                1,
                6_000,
                6_010,
                Condition::IfVersion(5),
                Outcome::Deleted(true),
            ),
        ]);
    }

    #[test]
    fn unknown_outcome_write_cannot_be_undone_or_go_back_in_version() {
        // Once seen, it stays: a later read of the older value is a violation.
        assert_violation(&[
            write(0, 0, 10, 1, 5),
            lost_put(0, 20, 2),
            get(1, 30, 40, Some((2, 8))),
            get(1, 50, 60, Some((1, 5))),
        ]);
        // Its version, first seen by a read, must be above the previous ones.
        assert_violation(&[
            write(0, 0, 10, 1, 5),
            lost_put(0, 20, 2),
            get(1, 30, 40, Some((2, 3))),
        ]);
        // It cannot take effect before it was invoked.
        assert_violation(&[
            write(0, 0, 10, 1, 5),
            get(1, 30, 40, Some((2, 8))),
            lost_put(0, 50, 2),
        ]);
        // Once a read pinned its version, it is that version.
        assert_violation(&[
            lost_put(0, 0, 2),
            get(1, 30, 40, Some((2, 8))),
            get(1, 50, 60, Some((2, 9))),
        ]);
    }

    #[test]
    fn unknown_outcome_delete_and_get() {
        let lost_delete = |invoke| {
            op(
                0,
                invoke,
                None,
                Call::Delete {
                    condition: Condition::Always,
                },
                Outcome::Unknown,
            )
        };
        assert_linearizable(&[write(0, 0, 10, 1, 5), lost_delete(20), get(1, 30, 40, None)]);
        assert_violation(&[write(0, 0, 10, 1, 5), get(1, 15, 18, None), lost_delete(20)]);
        // A get that never returned constrains nothing, whatever it holds.
        let pending_get = op(1, 30, None, Call::Get, Outcome::Got(Some((99, 1))));
        assert_linearizable(&[write(0, 0, 10, 1, 5), pending_get]);
    }

    #[test]
    fn reused_or_decreasing_version_is_a_violation() {
        let explanation = assert_violation(&[write(0, 0, 10, 1, 5), write(0, 20, 30, 2, 5)]);
        assert!(
            explanation.contains("version 5, not above version 5"),
            "{explanation}"
        );
        assert_violation(&[write(0, 0, 10, 1, 5), write(0, 20, 30, 2, 3)]);
        // Never reused, even after a delete.
        assert_violation(&[
            write(0, 0, 10, 1, 5),
            del(0, 12, 14, Condition::Always, Outcome::Deleted(true)),
            write(0, 20, 30, 2, 4),
        ]);
        // Concurrent writes cannot share a version either.
        assert_violation(&[write(0, 0, 100, 1, 5), write(1, 0, 100, 2, 5)]);
    }

    #[test]
    fn conditional_put_failing_when_it_should_succeed_is_a_violation() {
        use Condition::*;
        let first = write(0, 0, 10, 1, 5);
        for condition in [IfVersion(5), IfPresent] {
            assert_violation(&[
                first.clone(),
                put(1, 20, 30, 2, condition, Outcome::ConditionFailed),
            ]);
        }
        // A create of the absent key.
        assert_violation(&[put(1, 0, 1, 2, IfAbsent, Outcome::ConditionFailed)]);
        // With a write racing it, the condition may have failed.
        assert_linearizable(&[
            first.clone(),
            put(1, 20, 30, 2, IfVersion(5), Outcome::ConditionFailed),
            write(2, 15, 25, 3, 6),
        ]);
        // And the other way round: succeeding when it should have failed.
        assert_violation(&[
            first.clone(),
            put(1, 20, 30, 2, IfAbsent, Outcome::Written(6)),
        ]);
        assert_violation(&[first, put(1, 20, 30, 2, IfVersion(4), Outcome::Written(6))]);
    }

    #[test]
    fn keys_are_checked_separately_and_the_violating_key_is_named() {
        let on = |key: &str, mut op: Operation| {
            op.key = key.to_owned();
            op
        };
        let history = [
            on("a", write(0, 0, 10, 1, 5)),
            // Another key's read does not see key a's write.
            on("b", get(1, 20, 30, None)),
            on("b", write(0, 40, 50, 2, 6)),
            on("a", get(1, 60, 70, Some((1, 5)))),
            on("b", get(1, 80, 90, None)),
        ];
        match check(&history, BUDGET) {
            Verdict::Violation { key, .. } => assert_eq!(key, "b"),
            other => panic!("expected a violation on b, got {other}"),
        }
        assert_linearizable(&history[..4]);
    }

    #[test]
    fn malformed_operations_are_reported() {
        let backwards = write(0, 10, 5, 1, 5);
        let mismatched = op(0, 0, Some(1), Call::Get, Outcome::Written(5));
        let bad_delete = del(0, 0, 1, Condition::IfAbsent, Outcome::Deleted(false));
        for history in [[backwards], [mismatched], [bad_delete]] {
            let explanation = assert_violation(&history);
            assert!(explanation.contains("malformed"), "{explanation}");
        }
    }

    #[test]
    fn exhausted_budget_is_inconclusive() {
        let history = simulate(7, 10, 200, 0.0);
        assert_eq!(
            check(&history, Duration::ZERO),
            Verdict::Inconclusive {
                key: "k".to_owned()
            }
        );
    }

    /// A store that is linearizable by construction: every operation takes
    /// effect at a random instant between its invocation and its return, in
    /// the order of those instants.
    fn simulate(seed: u64, clients: usize, per_client: usize, unknown_rate: f64) -> Vec<Operation> {
        let mut rng = StdRng::seed_from_u64(seed);
        // (instant it takes effect, client, invoke, return)
        let mut slots = Vec::with_capacity(clients * per_client);
        for client in 0..clients {
            let mut t = rng.random_range(0..10_000u64);
            for _ in 0..per_client {
                let duration = rng.random_range(1_000..60_000u64);
                slots.push((t + rng.random_range(0..=duration), client, t, t + duration));
                t += duration + rng.random_range(0..20_000u64);
            }
        }
        slots.sort_unstable();
        let mut store: Option<(u64, u64)> = None;
        let mut next_version: u64 = 1;
        let mut next_value = 1;
        // The last version each client saw, for its compare-and-swaps.
        let mut seen: Vec<Option<u64>> = vec![None; clients];
        let mut history = Vec::with_capacity(slots.len());
        for (_, client, invoke, ret) in slots {
            let expected = seen[client].unwrap_or(next_version.saturating_sub(1));
            let value = next_value;
            let call = match rng.random_range(0..20) {
                0..=9 => Call::Get,
                10..=12 => Call::Put {
                    value,
                    condition: Condition::Always,
                },
                13 => Call::Put {
                    value,
                    condition: Condition::IfAbsent,
                },
                14 => Call::Put {
                    value,
                    condition: Condition::IfPresent,
                },
                15 | 16 => Call::Put {
                    value,
                    condition: Condition::IfVersion(expected),
                },
                17 | 18 => Call::Delete {
                    condition: Condition::Always,
                },
                _ => Call::Delete {
                    condition: Condition::IfVersion(expected),
                },
            };
            let holds = |condition| match condition {
                Condition::Always => true,
                Condition::IfAbsent => store.is_none(),
                Condition::IfPresent => store.is_some(),
                Condition::IfVersion(v) => store.is_some_and(|(_, version)| version == v),
            };
            let (after, mut outcome) = match call {
                Call::Get => (store, Outcome::Got(store)),
                Call::Put { value, condition } if holds(condition) => {
                    next_value += 1;
                    next_version += 1;
                    (Some((value, next_version)), Outcome::Written(next_version))
                }
                Call::Delete { condition } if holds(condition) => {
                    (None, Outcome::Deleted(store.is_some()))
                }
                Call::Put { .. } => {
                    next_value += 1;
                    (store, Outcome::ConditionFailed)
                }
                Call::Delete { .. } => (store, Outcome::ConditionFailed),
            };
            let mut ret = Some(ret);
            if call != Call::Get && rng.random_bool(unknown_rate) {
                // Timed out: applied or not, the client cannot tell.
                if rng.random_bool(0.5) {
                    store = after;
                }
                outcome = Outcome::Unknown;
                ret = None;
            } else {
                store = after;
            }
            match outcome {
                Outcome::Got(Some((_, version))) | Outcome::Written(version) => {
                    seen[client] = Some(version);
                }
                _ => {}
            }
            history.push(op(client, invoke, ret, call, outcome));
        }
        history
    }

    /// Replaces the last read of `history` (in the order things took effect)
    /// by the first acknowledged write's value and version, after another
    /// acknowledged write returned before the read was invoked: certainly
    /// stale.
    fn make_last_read_stale(history: &mut [Operation]) {
        let first = history
            .iter()
            .find_map(|op| match (op.call, op.outcome) {
                (Call::Put { value, .. }, Outcome::Written(version)) => Some((value, version)),
                _ => None,
            })
            .expect("the simulation wrote something");
        let read = history
            .iter()
            .rposition(|op| op.call == Call::Get)
            .expect("the simulation read something");
        let overwritten = history.iter().any(|op| {
            matches!(op.outcome, Outcome::Written(v) if v > first.1)
                && op.ret.is_some_and(|ret| ret < history[read].invoke)
        });
        assert!(overwritten, "the mutated read must be certainly stale");
        history[read].outcome = Outcome::Got(Some(first));
    }

    /// Whether some order of `ops` (all of known outcome, any subset of
    /// the unknown ones) respects real time and the model: every order
    /// tried, with no shortcut but the plain memo of failed (set, state).
    /// At most 128 operations.
    fn brute_force(
        ops: &[Op],
        done: u128,
        state: State,
        failed: &mut HashSet<(u128, State)>,
    ) -> bool {
        let open = |i: usize| done & (1 << i) == 0;
        if (0..ops.len()).all(|i| !open(i) || ops[i].ret.is_none()) {
            return true;
        }
        if failed.contains(&(done, state)) {
            return false;
        }
        for i in (0..ops.len()).filter(|&i| open(i)) {
            // Next only if no open operation returned before it was invoked.
            if (0..ops.len()).any(|j| open(j) && ops[j].ret.is_some_and(|ret| ret < ops[i].invoke))
            {
                continue;
            }
            if let Ok(after) = step(&state, &ops[i])
                && brute_force(ops, done | (1 << i), after, failed)
            {
                return true;
            }
        }
        failed.insert((done, state));
        false
    }

    #[test]
    fn search_agrees_with_brute_force_on_small_histories() {
        let mut rng = StdRng::seed_from_u64(11);
        let (mut linearizable, mut violations) = (0, 0);
        for seed in 0..2_000 {
            let clients = rng.random_range(1..=4);
            let unknown_rate = [0.0, 0.1, 0.3][rng.random_range(0..3)];
            let mut history = simulate(seed, clients, rng.random_range(1..=10), unknown_rate);
            // Perturb one outcome half of the time, keeping it well formed.
            if rng.random_bool(0.5) {
                let victim = rng.random_range(0..history.len());
                let top = history.len() as u64 + 2;
                let small = |rng: &mut StdRng| rng.random_range(0..top);
                history[victim].outcome = match history[victim].call {
                    Call::Get if rng.random_bool(0.3) => Outcome::Got(None),
                    Call::Get => Outcome::Got(Some((small(&mut rng), small(&mut rng)))),
                    Call::Put { .. } if rng.random_bool(0.3) => Outcome::ConditionFailed,
                    Call::Put { .. } => Outcome::Written(small(&mut rng)),
                    Call::Delete { .. } if rng.random_bool(0.3) => Outcome::ConditionFailed,
                    Call::Delete { .. } => Outcome::Deleted(rng.random_bool(0.5)),
                };
                if rng.random_bool(0.3) {
                    history[victim].ret = history[victim].ret.map(|ret| ret + 40_000);
                }
            }
            let indices: Vec<usize> = (0..history.len()).collect();
            let ops = prepare(&history, &indices).expect("well formed");
            let expected = brute_force(&ops, 0, State::INITIAL, &mut HashSet::new());
            let verdict = check(&history, BUDGET);
            match (&verdict, expected) {
                (Verdict::Linearizable, true) => linearizable += 1,
                (Verdict::Violation { .. }, false) => violations += 1,
                _ => panic!(
                    "seed {seed}: search says {verdict}, brute force {expected}: {history:#?}"
                ),
            }
        }
        // Both answers were exercised, not just one.
        assert!(
            linearizable > 500 && violations > 500,
            "{linearizable} / {violations}"
        );
    }

    /// Appends, after everything else returned, an acknowledged write and
    /// then a read that misses it: a violation no version can reveal, so
    /// only an exhaustive search finds it.
    fn append_lost_write(history: &mut Vec<Operation>) {
        let end = history.iter().filter_map(|op| op.ret).max().unwrap_or(0);
        let mut top = (0, 0);
        for op in history.iter() {
            if let (Call::Put { value, .. }, Outcome::Written(version)) = (op.call, op.outcome) {
                top = (top.0.max(value), top.1.max(version));
            }
        }
        history.push(write(0, end + 10, end + 20, top.0 + 1, top.1 + 1));
        history.push(get(1, end + 30, end + 40, None));
    }

    /// Checks with the 2 s budget of the fault suite's perf requirement.
    fn timed(seed: u64, what: &str, history: &[Operation]) -> Verdict {
        let started = Instant::now();
        let verdict = check(history, Duration::from_secs(2));
        let took = started.elapsed();
        let unknown = history.iter().filter(|op| op.ret.is_none()).count();
        let short = match &verdict {
            Verdict::Violation { .. } => "a violation".to_owned(),
            other => other.to_string(),
        };
        eprintln!(
            "seed {seed}: {} ops ({unknown} unknown) {what}: {short} in {took:?}",
            history.len()
        );
        assert!(took < Duration::from_millis(2_100), "seed {seed}: {took:?}");
        verdict
    }

    #[test]
    fn simulated_store_is_linearizable_and_violations_in_it_are_found() {
        for seed in [1, 2, 3] {
            let history = simulate(seed, 10, 200, 0.0);
            let verdict = timed(seed, "as run", &history);
            assert_eq!(verdict, Verdict::Linearizable, "seed {seed}");

            let mut stale = history.clone();
            make_last_read_stale(&mut stale);
            let verdict = timed(seed, "with a stale read", &stale);
            assert!(
                matches!(verdict, Verdict::Violation { .. }),
                "seed {seed}: {verdict}"
            );

            let mut lost = history;
            append_lost_write(&mut lost);
            let verdict = timed(seed, "with a lost write", &lost);
            assert!(
                matches!(verdict, Verdict::Violation { .. }),
                "seed {seed}: {verdict}"
            );
        }
    }

    #[test]
    fn simulated_store_with_unknown_outcomes_is_linearizable() {
        for seed in [4, 5] {
            let history = simulate(seed, 10, 200, 0.05);
            assert!(history.iter().any(|op| op.ret.is_none()), "seed {seed}");
            let verdict = timed(seed, "as run", &history);
            assert_eq!(verdict, Verdict::Linearizable, "seed {seed}");

            // Versions reveal a stale read whatever the unknown outcomes.
            let mut stale = history;
            make_last_read_stale(&mut stale);
            let verdict = timed(seed, "with a stale read", &stale);
            assert!(
                matches!(verdict, Verdict::Violation { .. }),
                "seed {seed}: {verdict}"
            );
        }
    }
}
