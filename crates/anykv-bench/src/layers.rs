//! `cargo xtask bench layers`: what the layers of a [`Kv`] cost per
//! operation (issue 12), on memory:// and redb://.
//!
//! One driver per backend, wrapped in several stacks: the raw driver, the
//! default stack, no standard layers, and the default stack plus one extra
//! layer (a pass-through user layer, chaos with no faults, fail-fast,
//! metrics with no recorder installed). For `get` of an existing key and an
//! unconditional `put` (memory only: redb's put is a durable commit whose
//! noise hides the layers), each stack runs `--rounds` rounds of sequential
//! operations on a current-thread runtime, the stacks taking turns within a
//! round, and the table gives:
//! - **ns/op**: wall time per operation, the best round (the machine is
//!   shared: the best round is the one least disturbed);
//! - **CPU ns/op**: CPU time of the process's threads per operation
//!   (`/proc/self/task/*/schedstat`, nanoseconds on CPU), the best round:
//!   time spent waiting for a CPU taken by others does not count;
//! - **allocs/op** and **B/op**: heap allocations and bytes allocated per
//!   operation (the counting global allocator), which noise does not move;
//! - **extra CPU**: CPU ns/op minus the default stack's.

use std::{fmt::Write as _, path::PathBuf, sync::Arc, time::Instant};

use anyhow::{Context as _, Result, bail};
use anykv::{
    Bytes, Key, Kv, Layer, Next, Request, Response, StandardLayer, Store, async_trait,
    layers::{chaos::ChaosLayer, fail_fast::FailFastLayer, metrics::MetricsLayer},
};

/// Options of `anykv-bench layers`.
#[derive(clap::Args)]
pub struct LayersArgs {
    /// Backends: memory, redb (default: both).
    backends: Vec<String>,
    /// Rounds per stack and operation; the best one is reported.
    #[arg(long, default_value_t = 15)]
    rounds: u32,
    /// Wall time one round aims at, milliseconds (the operation count is
    /// calibrated per stack and operation to fill it).
    #[arg(long, default_value_t = 60)]
    round_ms: u64,
    /// Where the markdown goes (besides stdout).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results/layers.md"))]
    out: PathBuf,
    /// What code is measured, for the header (default: the HEAD commit).
    #[arg(long)]
    label: Option<String>,
}

/// A pass-through user layer: the cost of one extra `dyn Layer`.
struct Noop;

#[async_trait]
impl Layer for Noop {
    async fn call(&self, req: Request, next: Next<'_>) -> Result<Response, anykv::Error> {
        next.run(req).await
    }
}

/// The stacks measured, over one driver.
fn stacks(raw: &Arc<dyn Store>, cfg: &anykv::LayerConfig) -> Vec<(&'static str, Arc<dyn Store>)> {
    let with = |b: anykv::KvBuilder| -> Arc<dyn Store> { Arc::new(b.config(cfg.clone()).build()) };
    let base = || Kv::builder_for(raw.clone());
    let mut bare = base();
    for s in StandardLayer::ORDER {
        bare = bare.without(s);
    }
    vec![
        ("raw driver", raw.clone()),
        ("default stack", with(base())),
        ("no standard layers", with(bare)),
        ("default + noop user layer", with(base().layer(Noop))),
        (
            "default + chaos (no faults)",
            with(base().layer_below(ChaosLayer::new(1))),
        ),
        (
            "default + fail-fast",
            with(base().layer(FailFastLayer::new())),
        ),
        (
            "default + metrics (no recorder)",
            with(base().layer(MetricsLayer)),
        ),
    ]
}

/// One stack's figures for one operation.
struct Figures {
    wall_ns: f64,
    cpu_ns: f64,
    allocs: f64,
    bytes: f64,
}

#[derive(Clone, Copy)]
enum Op {
    Get,
    Put,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Put => "put",
        }
    }
}

/// Runs the bench and writes the table.
pub fn run(args: LayersArgs) -> Result<()> {
    let backends = if args.backends.is_empty() {
        vec!["memory".to_owned(), "redb".to_owned()]
    } else {
        args.backends.clone()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let mut md = header(&args);
    for backend in &backends {
        let url = match backend.as_str() {
            "memory" => "memory://layers-bench".to_owned(),
            "redb" => format!("redb://{}", dir.path().join("layers.redb").display()),
            other => bail!("layers bench: unknown backend {other:?} (memory, redb)"),
        };
        let table = rt.block_on(backend_table(backend, &url, &args))?;
        print!("{table}");
        md.push_str(&table);
    }
    std::fs::write(&args.out, &md).with_context(|| format!("writing {}", args.out.display()))?;
    println!("written to {}", args.out.display());
    Ok(())
}

async fn backend_table(backend: &str, url: &str, args: &LayersArgs) -> Result<String> {
    let (driver, config, cfg) = anykv::registry::prepare(url)?;
    let raw: Arc<dyn Store> = (driver.open)(config).await?;
    let key = Key::new("bench/a")?;
    raw.put(&key, "v".into(), Default::default()).await?;
    let stacks = stacks(&raw, &cfg);
    let mut out = format!(
        "\n## {backend}\n\n\
         | stack | op | ns/op | CPU ns/op | extra CPU ns/op | allocs/op | B/op |\n\
         |---|---|---:|---:|---:|---:|---:|\n"
    );
    // redb's put is a durable commit (~150 µs of CPU, more in fsync
    // waits): the layers' cost vanishes in its noise, so only get there.
    let ops: &[Op] = if backend == "redb" {
        &[Op::Get]
    } else {
        &[Op::Get, Op::Put]
    };
    for &op in ops {
        let figures = measure_all(&stacks, &key, op, args).await?;
        let default_cpu = figures[1].cpu_ns;
        for ((name, _), f) in stacks.iter().zip(&figures) {
            let extra = if name.starts_with("default +") {
                format!("{:+.0}", f.cpu_ns - default_cpu)
            } else {
                String::new()
            };
            writeln!(
                out,
                "| {name} | {} | {:.0} | {:.0} | {extra} | {:.1} | {:.0} |",
                op.name(),
                f.wall_ns,
                f.cpu_ns,
                f.allocs,
                f.bytes
            )?;
        }
    }
    raw.close().await?;
    Ok(out)
}

async fn once(store: &dyn Store, key: &Key, op: Op) -> Result<()> {
    match op {
        Op::Get => {
            std::hint::black_box(store.get(key).await?);
        }
        Op::Put => {
            let v = Bytes::from_static(b"v");
            std::hint::black_box(store.put(key, v, Default::default()).await?);
        }
    }
    Ok(())
}

/// Calibrates each stack's operation count, then runs `rounds` rounds,
/// each stack in turn within a round (so a burst of load elsewhere hits
/// them all alike), and keeps each stack's best round.
async fn measure_all(
    stacks: &[(&'static str, Arc<dyn Store>)],
    key: &Key,
    op: Op,
    args: &LayersArgs,
) -> Result<Vec<Figures>> {
    let mut counts = Vec::new();
    for (_, store) in stacks {
        // Warm-up and calibration: ~50 ms.
        let t = Instant::now();
        let mut warm = 0u64;
        while t.elapsed().as_millis() < 50 {
            once(&**store, key, op).await?;
            warm += 1;
        }
        let per_op = t.elapsed().as_nanos() as f64 / warm as f64;
        counts.push(((args.round_ms as f64 * 1e6 / per_op) as u64).clamp(100, 2_000_000));
    }
    let mut best: Vec<Figures> = stacks
        .iter()
        .map(|_| Figures {
            wall_ns: f64::MAX,
            cpu_ns: f64::MAX,
            allocs: f64::MAX,
            bytes: 0.0,
        })
        .collect();
    for _ in 0..args.rounds.max(1) {
        for (((_, store), &n), best) in stacks.iter().zip(&counts).zip(&mut best) {
            let allocs = crate::alloc_stats();
            let cpu = cpu_ns()?;
            let t = Instant::now();
            for _ in 0..n {
                once(&**store, key, op).await?;
            }
            let wall = t.elapsed().as_nanos() as f64;
            let cpu = (cpu_ns()? - cpu) as f64;
            let after = crate::alloc_stats();
            best.wall_ns = best.wall_ns.min(wall / n as f64);
            best.cpu_ns = best.cpu_ns.min(cpu / n as f64);
            // Deterministic but for background work (timers, redb's
            // threads): the fewest is the operation's own.
            let a = (after.0 - allocs.0) as f64 / n as f64;
            if a < best.allocs {
                best.allocs = a;
                best.bytes = (after.1 - allocs.1) as f64 / n as f64;
            }
        }
    }
    Ok(best)
}

/// CPU time of every thread of this process so far, in ns (the first field
/// of each `/proc/self/task/<tid>/schedstat`).
fn cpu_ns() -> Result<u64> {
    let mut sum = 0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let path = task?.path().join("schedstat");
        // A thread may end between the listing and the read.
        let Ok(s) = std::fs::read_to_string(&path) else {
            continue;
        };
        let first = s.split_whitespace().next().unwrap_or("0");
        sum += first
            .parse::<u64>()
            .with_context(|| format!("{}: {s:?}", path.display()))?;
    }
    Ok(sum)
}

fn header(args: &LayersArgs) -> String {
    let crate::RunInfo {
        code,
        date,
        load,
        cpus,
    } = crate::RunInfo::now(args.label.as_deref());
    format!(
        "# anykv layers bench\n\n\
         Run {date}; code: {code}; release build; {cpus} CPUs, load average at the start {}.\n\n\
         Sequential `get` of an existing key and unconditional `put` (memory only), one \
         current-thread runtime; best of {} rounds of ~{} ms each, the stacks taking turns. ns/op: wall time; CPU ns/op: CPU time of \
         the process's threads (schedstat), so a busy machine moves it less; extra CPU: \
         minus the default stack's; allocs/op and B/op: from the counting allocator. \
         See `crates/anykv-bench/src/layers.rs`.\n",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        args.rounds,
        args.round_ms,
    )
}
