//! One measured case (what the parent asks a child process to run) and its
//! result (what the child prints back as one JSON line).

use serde::{Deserialize, Serialize};

/// Which client holds the watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Side {
    /// `anykv::open` — the driver inside the standard layers, one handle.
    Anykv,
    /// etcd-client: all N watches on ONE gRPC watch stream (client watch ids).
    EtcdOneStream,
    /// etcd-client: one gRPC watch stream per watch (one HTTP/2 connection).
    EtcdStreamPerWatch,
    /// zookeeper-client: N one-shot data watches (`get_and_watch_data` on
    /// existing znodes, `check_and_watch_stat` on missing ones), one session.
    ZkRaw,
}

impl Side {
    /// Row label.
    pub fn label(self) -> &'static str {
        match self {
            Side::Anykv => "anykv",
            Side::EtcdOneStream => "raw: 1 stream",
            Side::EtcdStreamPerWatch => "raw: stream/watch",
            Side::ZkRaw => "raw: data watches",
        }
    }
}

/// What one watch covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// `Target::Key(k/NNNNN)`; the writer puts that key.
    Key,
    /// `Target::Prefix(p/NNNNN)`; the writer puts `p/NNNNN/x`.
    Prefix,
}

/// One case, run in a child process of its own (clean memory, socket and
/// CPU figures; a hang or crash fails only this row).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaseSpec {
    /// Backend name (memory, redb, etcd, zookeeper, consul).
    pub backend: String,
    /// Who watches.
    pub side: Side,
    /// Store URL without a namespace (`etcd://127.0.0.1:P`, `redb:///tmp/x.redb`…).
    pub url: String,
    /// The server process, for its CPU time (none for memory/redb).
    pub server_pid: Option<u32>,
    /// Namespace (anykv) / key root (raw) of this case, unique per run.
    pub ns: String,
    /// Number of watches.
    pub n: usize,
    /// Key or prefix targets.
    pub kind: Kind,
    /// Whether the watched keys exist before the watches are opened.
    pub existing: bool,
    /// Writer pace, puts per second.
    pub rate: f64,
    /// At most this many seconds of puts (puts = min(N, rate × this)).
    pub max_put_secs: f64,
    /// Idle window for the CPU figures, in seconds.
    pub idle_secs: f64,
    /// A second idle window right after the first (0: none), in seconds.
    #[serde(default)]
    pub steady_secs: f64,
    /// How long to wait for late events after the last acknowledgement.
    pub drain_secs: f64,
    /// Watches being opened at once during setup.
    pub setup_concurrency: usize,
    /// Puts of the no-watch latency baseline, and as many again of
    /// unwatched keys while the watches are open and idle.
    pub base_puts: usize,
    /// Bound of the setup phase (and of key pre-creation), in seconds.
    pub step_timeout_secs: f64,
}

impl CaseSpec {
    /// Puts the writer makes (one per watched key, capped by time).
    pub fn puts(&self) -> usize {
        let cap = (self.rate * self.max_put_secs).floor() as usize;
        self.n.min(cap.max(1))
    }

    /// Unwatched keys the case writes: the no-watch baseline's, then as
    /// many for the puts made while the watches are idle (other keys, so
    /// that both are the same put: a create, or an update of a key created
    /// beforehand).
    pub fn base_keys(&self) -> usize {
        2 * self.base_puts
    }
}

/// What a case measured. Times in ms unless named otherwise; `None`: not
/// measured (e.g. the case failed before that phase).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CaseResult {
    /// Why the case failed (the figures up to the failure are kept).
    pub error: Option<String>,
    /// Wall time to open all N watches.
    pub setup_ms: Option<f64>,
    /// Client CPU time spent opening them.
    pub setup_cpu_ms: Option<f64>,
    /// Puts made (= events expected: one per watched key).
    pub expected: u64,
    /// Watched keys whose event arrived.
    pub delivered: u64,
    /// Items that were errors on the watch streams.
    pub watch_errors: u64,
    /// Events for a key other than the watch's, or repeated events.
    pub extra_events: u64,
    /// The first watch error.
    pub first_watch_error: Option<String>,
    /// Put acknowledgement → event delay: p50, p99, max.
    pub delay: Option<(f64, f64, f64)>,
    /// (RSS after setup − RSS before) / N, bytes.
    pub rss_per_watch: Option<f64>,
    /// RSS before setup, bytes.
    pub rss_before: u64,
    /// (live heap bytes after setup − before) / N: what the watches hold,
    /// without the allocator's free memory that RSS also counts.
    #[serde(default)]
    pub heap_per_watch: Option<f64>,
    /// Sockets of the process before setup / after setup.
    pub sockets: (u64, u64),
    /// Client CPU ms per second over the idle window.
    pub idle_client_cpu: Option<f64>,
    /// Server CPU ms per second over the idle window.
    pub idle_server_cpu: Option<f64>,
    /// Seconds waited for the server to be quiet before the steady window.
    #[serde(default)]
    pub quiet_after_secs: Option<f64>,
    /// Server CPU ms per second over a window as long as the steady one,
    /// before the watches open (after a wait for a quiet server as for the
    /// steady window): what the server burns then without them, the
    /// steady window's control.
    #[serde(default)]
    pub control_server_cpu: Option<f64>,
    /// Client CPU ms per second over the steady window (the second one).
    #[serde(default)]
    pub steady_client_cpu: Option<f64>,
    /// Server CPU ms per second over the steady window.
    #[serde(default)]
    pub steady_server_cpu: Option<f64>,
    /// Put latency p50 / p99 / max with the watches open (the paced writer).
    pub put: Option<(f64, f64, f64)>,
    /// Put latency p50 / p99 / max with no watch open (same pace, same handle kind).
    pub base_put: Option<(f64, f64, f64)>,
    /// Put latency p50 / p99 / max of the same puts on other unwatched
    /// keys while the N watches are open (after the idle windows, before
    /// the watched puts): what open watches cost the store's other writes.
    #[serde(default)]
    pub idle_put: Option<(f64, f64, f64)>,
    /// Puts that failed.
    pub put_failures: u64,
    /// Wall seconds of the paced puts (to see whether the pace held).
    pub put_secs: f64,
    /// Client CPU ms of the whole put + delivery phase.
    pub put_cpu_ms: Option<f64>,
}
