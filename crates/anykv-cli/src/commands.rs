//! From parsed arguments to results: every command is first checked into a
//! [`Plan`] (keys validated, the value read) without touching the store, so
//! a bad key or an unreadable file fails with exit 2 before any connection
//! (and before a redb file is created); then the plan runs against the store.

use std::{
    io::{IsTerminal, Read},
    path::PathBuf,
    time::Instant,
};

use anykv::{
    Condition, Key, Kv, Prefix, PutOptions, Start, Store, Target, Version, config::redact,
};
use bytes::Bytes;
use futures::StreamExt;

use crate::{
    child::CommandLine,
    cli::Cli,
    cli::{Command, DEFAULT_URL, PutArgs},
    coord::{self, ElectPlan, RegisterPlan},
    copy, dump, exit,
    exit::Failure,
    lock::{self, LockPlan},
    output,
    restore::{self, RestorePlan},
    signals::Signals,
};

/// A checked command, ready to run.
#[derive(Debug)]
pub enum Plan {
    /// `get`
    Get {
        /// Key read.
        key: Key,
        /// Print JSON rather than the raw value.
        json: bool,
    },
    /// `put`
    Put {
        /// Key written.
        key: Key,
        /// The value.
        value: Bytes,
        /// Condition and TTL.
        opts: PutOptions,
    },
    /// `del KEY`
    Del {
        /// Key deleted.
        key: Key,
        /// `Always` or `IfVersion`.
        condition: Condition,
    },
    /// `del --prefix` / `del --all`
    DelPrefix {
        /// Everything strictly below it goes.
        prefix: Prefix,
    },
    /// `list`
    List {
        /// Listed prefix.
        prefix: Prefix,
        /// JSON array output.
        json: bool,
    },
    /// `keys`
    Keys {
        /// Prefix whose children are printed.
        prefix: Prefix,
    },
    /// `watch`
    Watch {
        /// Key or prefix.
        target: Target,
        /// Now, or replay from a revision.
        start: Start,
        /// JSON lines output.
        json: bool,
    },
    /// `lock`
    Lock(LockPlan),
    /// `health`
    Health,
    /// `drivers`
    Drivers {
        /// JSON array output.
        json: bool,
    },
    /// `copy`
    Copy {
        /// Source URL.
        src: String,
        /// Destination URL.
        dst: String,
        /// What to copy.
        prefix: Prefix,
    },
    /// `dump`
    Dump {
        /// What to dump.
        prefix: Prefix,
        /// Output file; stdout when None.
        file: Option<PathBuf>,
    },
    /// `restore`, its input checked
    Restore(RestorePlan),
    /// `elect`
    Elect(ElectPlan),
    /// `leader`
    Leader {
        /// The election.
        name: Key,
        /// Follow changes.
        watch: bool,
        /// JSON output.
        json: bool,
    },
    /// `register`
    Register(RegisterPlan),
    /// `completions`
    Completions(clap_complete::Shell),
}

/// Checks arguments and reads the value to write; never touches a store.
pub fn plan(command: Command) -> Result<Plan, Failure> {
    Ok(match command {
        Command::Get(a) => Plan::Get {
            key: key(a.key)?,
            json: a.json,
        },
        Command::Put(a) => {
            let key = key(a.key.clone())?;
            let mut opts = PutOptions {
                condition: if a.if_absent {
                    Condition::IfAbsent
                } else if a.if_present {
                    Condition::IfPresent
                } else if let Some(v) = a.if_version {
                    Condition::IfVersion(Version::new(v))
                } else {
                    Condition::Always
                },
                ttl: None,
            };
            if let Some(ttl) = a.ttl {
                if ttl.is_zero() {
                    return Err(Failure::usage("--ttl must be positive"));
                }
                opts = opts.with_ttl(ttl);
            }
            Plan::Put {
                key,
                value: read_value(a)?,
                opts,
            }
        }
        Command::Del(a) if a.all => Plan::DelPrefix {
            prefix: Prefix::root(),
        },
        Command::Del(a) => {
            let name = a.key.unwrap_or_default();
            if a.prefix {
                if name.is_empty() {
                    return Err(Failure::usage(
                        "an empty prefix would delete every key; use `del --all` for that",
                    ));
                }
                Plan::DelPrefix {
                    prefix: prefix(name)?,
                }
            } else {
                Plan::Del {
                    key: key(name)?,
                    condition: a
                        .if_version
                        .map_or(Condition::Always, |v| Condition::IfVersion(Version::new(v))),
                }
            }
        }
        Command::List(a) => Plan::List {
            prefix: prefix(a.prefix)?,
            json: a.json,
        },
        Command::Keys(a) => Plan::Keys {
            prefix: prefix(a.prefix)?,
        },
        Command::Watch(a) => {
            let target = match (a.key, a.prefix) {
                (Some(k), None) => Target::Key(key(k)?),
                (None, Some(p)) => Target::Prefix(prefix(p)?),
                // clap enforces exactly one of the two.
                _ => return Err(Failure::usage("watch needs a KEY or --prefix PREFIX")),
            };
            // `--from REV` is inclusive (as etcdctl's --rev); the API's
            // `Start::After(r)` delivers revisions greater than r.
            let start = a
                .from
                .map_or(Start::Now, |rev| Start::After(rev.saturating_sub(1)));
            Plan::Watch {
                target,
                start,
                json: a.json,
            }
        }
        Command::Lock(a) => Plan::Lock(LockPlan::new(key(a.key.clone())?, a)),
        Command::Health => Plan::Health,
        Command::Drivers(a) => Plan::Drivers { json: a.json },
        Command::Copy(a) => {
            if a.src == a.dst {
                return Err(Failure::usage("source and destination are the same store"));
            }
            Plan::Copy {
                src: a.src,
                dst: a.dst,
                prefix: prefix(a.prefix)?,
            }
        }
        Command::Dump(a) => Plan::Dump {
            prefix: prefix(a.prefix)?,
            file: a.file,
        },
        Command::Restore(a) => Plan::Restore(restore::check(a.file, a.prefix, a.clean)?),
        Command::Elect(a) => {
            positive_ttl(a.ttl)?;
            Plan::Elect(ElectPlan {
                name: key(a.name)?,
                value: Bytes::from(
                    a.value
                        .unwrap_or_else(|| format!("anykv pid {}", std::process::id())),
                ),
                ttl: a.ttl,
                wait: a.wait,
                command: CommandLine::new(a.child.command),
            })
        }
        Command::Leader(a) => Plan::Leader {
            name: key(a.name)?,
            watch: a.watch,
            json: a.json,
        },
        Command::Register(a) => {
            positive_ttl(a.ttl)?;
            Plan::Register(RegisterPlan {
                key: key(a.key)?,
                value: Bytes::from(a.value),
                ttl: a.ttl,
                if_absent: a.if_absent,
                command: CommandLine::new(a.child.command),
            })
        }
        Command::Completions(a) => Plan::Completions(a.shell),
    })
}

fn positive_ttl(ttl: std::time::Duration) -> Result<(), Failure> {
    if ttl.is_zero() {
        return Err(Failure::usage("--ttl must be positive"));
    }
    Ok(())
}

fn key(s: String) -> Result<Key, Failure> {
    Key::new(s).map_err(Failure::from)
}

fn prefix(s: String) -> Result<Prefix, Failure> {
    Prefix::new(s).map_err(Failure::from)
}

/// The value of `put`: the argument's bytes, a file, or stdin for `-`.
fn read_value(a: PutArgs) -> Result<Bytes, Failure> {
    if let Some(path) = &a.file {
        return std::fs::read(path)
            .map(Bytes::from)
            .map_err(|e| Failure::usage(format!("cannot read {}: {e}", path.display())));
    }
    let Some(arg) = a.value else {
        // clap requires VALUE or --file.
        return Err(Failure::usage("put needs a VALUE, `-` or --file FILE"));
    };
    if arg == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .lock()
            .read_to_end(&mut buf)
            .map_err(|e| Failure::usage(format!("cannot read stdin: {e}")))?;
        return Ok(Bytes::from(buf));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStringExt;
        Ok(Bytes::from(arg.into_vec()))
    }
    #[cfg(not(unix))]
    {
        arg.into_string()
            .map(Bytes::from)
            .map_err(|_| Failure::usage("VALUE is not valid Unicode; use --file or stdin"))
    }
}

/// Runs a plan; returns the exit code on success.
pub async fn run(url: Option<String>, plan: Plan) -> Result<u8, Failure> {
    let url = url.unwrap_or_else(|| DEFAULT_URL.to_owned());
    match plan {
        Plan::Drivers { json } => drivers(json),
        Plan::Completions(shell) => completions(shell),
        Plan::Copy { src, dst, prefix } => copy::run(&src, &dst, &prefix).await,
        Plan::Health => health(&url).await,
        plan => {
            let kv = anykv::open(&url).await?;
            let outcome = on_store(&kv, plan).await;
            // Close on every path, so that a driver's background work
            // (redb's writer, a network session) ends cleanly.
            let closed = kv.close().await;
            let code = outcome?;
            closed?;
            Ok(code)
        }
    }
}

async fn on_store(kv: &Kv, plan: Plan) -> Result<u8, Failure> {
    match plan {
        Plan::Get { key, json } => {
            let kv = kv
                .get(&key)
                .await?
                .ok_or_else(|| Failure::not_found(key.as_str()))?;
            if json {
                output::println(&output::to_json(&output::JsonPair::new(&kv)))?;
            } else {
                output::write_raw(&kv.value)?;
                if output::newline_after(&kv.value, std::io::stdout().is_terminal()) {
                    output::write_raw(b"\n")?;
                }
            }
        }
        Plan::Put { key, value, opts } => {
            let version = kv.put(&key, value, opts).await?;
            output::println(&version.to_string())?;
        }
        Plan::Del { key, condition } => {
            if !kv.delete(&key, condition).await? {
                return Err(Failure::not_found(key.as_str()));
            }
        }
        Plan::DelPrefix { prefix } => {
            let n = kv.delete_prefix(&prefix).await?;
            output::println(&n.to_string())?;
        }
        Plan::List { prefix, json } => {
            let pairs = kv.list(&prefix).await?;
            if json {
                let all: Vec<_> = pairs.iter().map(output::JsonPair::new).collect();
                output::println(&output::to_json(&all))?;
            } else {
                for p in &pairs {
                    output::println(&output::list_line(p))?;
                }
            }
        }
        Plan::Keys { prefix } => {
            for name in kv.keys(&prefix).await? {
                output::println(&name)?;
            }
        }
        Plan::Watch {
            target,
            start,
            json,
        } => watch(kv, target, start, json).await?,
        Plan::Lock(plan) => return lock::run(kv, plan).await,
        Plan::Dump { prefix, file } => return dump::run(kv, &prefix, file).await,
        Plan::Restore(plan) => return restore::run(kv, plan).await,
        Plan::Elect(plan) => return coord::elect(kv, plan).await,
        Plan::Leader { name, watch, json } => return coord::leader(kv, &name, watch, json).await,
        Plan::Register(plan) => return coord::register(kv, plan).await,
        Plan::Health | Plan::Drivers { .. } | Plan::Copy { .. } | Plan::Completions(_) => {
            return Err(Failure::usage(
                "internal: command does not use the --url store",
            ));
        }
    }
    Ok(exit::OK)
}

/// Prints events until Ctrl-C / SIGTERM (exit 0) or a stream error.
async fn watch(kv: &Kv, target: Target, start: Start, json: bool) -> Result<(), Failure> {
    let mut signals = Signals::new();
    let mut events = kv.watch(target, start).await?;
    loop {
        tokio::select! {
            _ = signals.next() => return Ok(()),
            item = events.next() => match item {
                Some(Ok(event)) => output::println(&output::event_line(&event, json))?,
                Some(Err(e)) => return Err(e.into()),
                // The layer turns a silent end into an error; be safe anyway.
                None => return Ok(()),
            },
        }
    }
}

/// `health`: open, probe, and report; exit 1 unless alive.
async fn health(url: &str) -> Result<u8, Failure> {
    println_kv("url", &redact(url))?;
    let kv = match anykv::open(url).await {
        Ok(kv) => kv,
        Err(e) if e.indicates_unreachable() => {
            println_kv("alive", "no")?;
            return Err(not_alive(e.into()));
        }
        Err(e) => return Err(e.into()),
    };
    println_kv("backend", kv.backend())?;
    let ns = kv.namespace().as_str();
    println_kv("namespace", if ns.is_empty() { "(root)" } else { ns })?;
    let started = Instant::now();
    let probed = kv.probe().await.map_err(Failure::from);
    let took = started.elapsed();
    let alive = kv.liveness().is_alive();
    let _ = kv.close().await;
    match &probed {
        Ok(()) => println_kv("probe", &format!("ok in {took:.1?}"))?,
        Err(f) => println_kv("probe", &format!("failed: {f}"))?,
    }
    println_kv("alive", if alive { "yes" } else { "no" })?;
    match probed {
        Ok(()) if alive => Ok(exit::OK),
        Ok(()) => Err(Failure::new(exit::FAILURE, "not alive")),
        Err(f) if !alive => Err(not_alive(f)),
        // The backend answered but refused the probe (e.g. permissions).
        Err(f) => Err(f),
    }
}

/// `health` exits 1 when the backend is not alive, whatever the cause.
fn not_alive(f: Failure) -> Failure {
    Failure::new(exit::FAILURE, format!("not alive: {f}"))
}

fn println_kv(label: &str, value: &str) -> std::io::Result<()> {
    output::println(&format!("{:<10} {value}", format!("{label}:")))
}

/// `drivers`: what this build links, with schemes and capabilities.
fn drivers(json: bool) -> Result<u8, Failure> {
    let all = anykv::drivers();
    if json {
        let list: Vec<_> = all.iter().map(|d| output::JsonDriver::new(d)).collect();
        output::println(&output::to_json(&list))?;
        return Ok(exit::OK);
    }
    for d in all {
        let schemes: Vec<String> = d.schemes.iter().map(|s| format!("{s}://")).collect();
        output::println(&format!(
            "{:<10} {:<16} {}",
            d.name,
            schemes.join(" "),
            d.description
        ))?;
        output::println(&format!(
            "{:<10} {}",
            "",
            output::capabilities_line(&(d.capabilities)())
        ))?;
    }
    Ok(exit::OK)
}

/// `completions SHELL`: the script on stdout.
fn completions(shell: clap_complete::Shell) -> Result<u8, Failure> {
    use clap::CommandFactory;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "anykv", &mut script);
    output::write_raw(&script)?;
    Ok(exit::OK)
}
