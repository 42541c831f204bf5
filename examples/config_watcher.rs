//! Typed configuration under a prefix, reloaded on change.
//!
//! Each key under `config/components/` holds one component's settings as a
//! JSON document (`ComponentConfig`). The watcher keeps a live, typed copy
//! with [`StoreExt::mirror_json`] and reacts to every change through its
//! `changes()` stream: a new or updated document is applied, a document that
//! does not decode is rejected (the previous settings stay), a deleted one
//! falls back to the defaults.
//!
//! ```text
//! cargo run --example config_watcher                     # memory://, with a scripted operator
//! cargo run --example config_watcher -- redb://cfg.redb  # any URL
//! cargo run --example config_watcher -- etcd://127.0.0.1:2379/app --watch
//! ```
//!
//! Without `--watch` a scripted "operator" task edits the configuration a
//! few times and the example exits once it has seen the last edit. With
//! `--watch` it writes nothing and follows the store until Ctrl-C: edit it
//! with `anykv --url URL put config/components/web '{"log_level":"debug","max_connections":8}'`.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context;
use anykv::{JsonChange, Key, Kv, Prefix, Store, StoreExt};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

/// One component's settings, as stored (JSON) under `config/components/NAME`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ComponentConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub log_level: String,
    /// Size of the component's connection pool.
    pub max_connections: u32,
    /// Feature switches; absent in older documents, hence the default.
    #[serde(default)]
    pub features: Vec<String>,
}

impl Default for ComponentConfig {
    fn default() -> Self {
        ComponentConfig {
            log_level: "info".into(),
            max_connections: 16,
            features: Vec::new(),
        }
    }
}

/// The prefix the configuration lives under.
pub const PREFIX: &str = "config/components";

/// What the watcher saw, for the example's test.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Changes applied (puts and deletes).
    pub reloads: usize,
    /// Documents rejected because they did not decode.
    pub rejected: usize,
    /// The configuration in force at the end, by component.
    pub current: BTreeMap<String, ComponentConfig>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = anykv_examples::Args::parse(&[])?;
    let url = args.positional(0, "memory://config-demo");
    let outcome = run(&url, !args.flag("watch")).await?;
    println!(
        "done: {} reloads, {} rejected; in force: {:?}",
        outcome.reloads, outcome.rejected, outcome.current
    );
    Ok(())
}

/// Watches the configuration at `url`; with `scripted`, also edits it and
/// returns after the last edit, else runs until Ctrl-C.
pub async fn run(url: &str, scripted: bool) -> anyhow::Result<Outcome> {
    let kv = anykv::open(url)
        .await
        .with_context(|| format!("opening {url}"))?;
    let prefix = Prefix::new(PREFIX)?;
    if scripted {
        // Written before the mirror starts: it reads them in its first snapshot.
        kv.put_json(&format!("{PREFIX}/web"), &ComponentConfig::default())
            .await?;
        kv.put_json(&format!("{PREFIX}/worker"), &ComponentConfig::default())
            .await?;
    }

    // One snapshot, then a watch from its revision: reads of `config` are
    // local and always current, and no change between the two is missed.
    let config = kv.mirror_json::<ComponentConfig>(&prefix).await?;
    // Subscribe before the operator writes, so that every edit is seen.
    let mut changes = config.changes();

    let mut outcome = Outcome::default();
    for (key, value) in config.list(&Prefix::root()) {
        match value {
            Ok(cfg) => {
                println!("loaded {}: {cfg:?}", key.name());
                outcome.current.insert(key.name().to_owned(), cfg);
            }
            Err(e) => println!("ignoring {key}: {e}"),
        }
    }

    let operator = scripted.then(|| tokio::spawn(operator(kv.clone())));
    let last_edit = Key::new(format!("{PREFIX}/worker"))?;
    loop {
        let change = tokio::select! {
            change = changes.next() => change,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(change) = change else {
            anyhow::bail!("the configuration mirror stopped");
        };
        match change {
            Ok(JsonChange::Put {
                key,
                value,
                revision,
            }) => {
                let name = key.name().to_owned();
                let old = outcome.current.insert(name.clone(), value.clone());
                // This is where an application resizes its pool, changes its
                // log filter, and so on.
                println!("reloaded {name} at revision {revision}: {old:?} -> {value:?}");
                outcome.reloads += 1;
            }
            Ok(JsonChange::Delete { key, revision }) => {
                outcome.current.remove(key.name());
                println!(
                    "{} deleted at revision {revision}: back to defaults",
                    key.name()
                );
                outcome.reloads += 1;
                if scripted && key == last_edit {
                    break;
                }
            }
            // A document that does not decode fails for its key only: keep
            // the settings in force rather than crash or half-apply.
            Err(e) if e.kind() == anykv::ErrorKind::Codec => {
                println!("rejected an invalid document, keeping the previous settings: {e}");
                outcome.rejected += 1;
            }
            // Anything else (the watch fell too far behind) means changes
            // may be missing: re-read the whole configuration from the mirror.
            Err(e) => {
                println!("resyncing after: {e}");
                outcome.current = config
                    .list(&Prefix::root())
                    .into_iter()
                    .filter_map(|(k, v)| Some((k.name().to_owned(), v.ok()?)))
                    .collect();
            }
        }
    }
    if let Some(operator) = operator {
        operator.await??;
    }
    Ok(outcome)
}

/// The scripted edits: a change, a broken document, its fix, a delete.
async fn operator(kv: Kv) -> anyhow::Result<()> {
    let pause = Duration::from_millis(100);
    tokio::time::sleep(pause).await;
    let web = ComponentConfig {
        log_level: "debug".into(),
        max_connections: 128,
        features: vec!["http2".into()],
    };
    kv.put_json(&format!("{PREFIX}/web"), &web).await?;
    tokio::time::sleep(pause).await;
    kv.set(&format!("{PREFIX}/worker"), "{\"log_level\": 42}")
        .await?;
    tokio::time::sleep(pause).await;
    let worker = ComponentConfig {
        max_connections: 4,
        ..ComponentConfig::default()
    };
    kv.put_json(&format!("{PREFIX}/worker"), &worker).await?;
    tokio::time::sleep(pause).await;
    kv.delete(&Key::new(format!("{PREFIX}/worker"))?, Default::default())
        .await?;
    Ok(())
}
