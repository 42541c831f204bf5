//! The driver registry: drivers register with [`inventory::submit!`], and
//! [`open`] picks one by URL scheme at run time.
//!
//! A driver crate registers itself like this (a third-party crate does the
//! same, and is found as soon as it is linked):
//!
//! ```no_run
//! use std::sync::Arc;
//! use anykv_core::{registry::Driver, Capabilities, Config, Result, Store};
//! # struct MyStore;
//! # fn connect(_c: Config) -> Result<MyStore> { unimplemented!() }
//! # #[async_trait::async_trait] impl Store for MyStore {
//! #   fn backend(&self) -> &'static str { "mine" }
//! #   fn capabilities(&self) -> &Capabilities { unimplemented!() }
//! #   async fn get(&self, _: &anykv_core::Key) -> Result<Option<anykv_core::KvPair>> { unimplemented!() }
//! #   async fn put(&self, _: &anykv_core::Key, _: bytes::Bytes, _: anykv_core::PutOptions) -> Result<anykv_core::Version> { unimplemented!() }
//! #   async fn delete(&self, _: &anykv_core::Key, _: anykv_core::Condition) -> Result<bool> { unimplemented!() }
//! #   async fn list(&self, _: &anykv_core::Prefix) -> Result<Vec<anykv_core::KvPair>> { unimplemented!() }
//! #   async fn delete_prefix(&self, _: &anykv_core::Prefix) -> Result<u64> { unimplemented!() }
//! #   async fn probe(&self) -> Result<()> { unimplemented!() }
//! # }
//! inventory::submit! {
//!     Driver {
//!         name: "mine",
//!         schemes: &["mine"],
//!         description: "my key-value store",
//!         params: &["shards"],
//!         path_is_namespace: true,
//!         capabilities: || Capabilities::full(1 << 20),
//!         open: |config| Box::pin(async move {
//!             Ok(Arc::new(connect(config)?) as Arc<dyn Store>)
//!         }),
//!     }
//! }
//! ```

use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;

use crate::{
    capability::Capabilities,
    config::Config,
    error::{Error, Result},
    key::Prefix,
    layer::{Kv, KvBuilder, LayerConfig},
    layers::chaos::{CHAOS_PARAMS, ChaosConfig},
    store::Store,
};

/// Query keys every URL accepts; the layers consume them.
pub const COMMON_PARAMS: &[&str] = &[
    "prefix",
    "timeout",
    "retries",
    "probe_interval",
    "liveness_interval",
];

/// A driver's constructor: connects from a parsed URL.
pub type OpenFn = fn(Config) -> BoxFuture<'static, Result<Arc<dyn Store>>>;

/// A driver's registration.
#[derive(Debug)]
pub struct Driver {
    /// Driver name, e.g. `"etcd"`.
    pub name: &'static str,
    /// URL schemes it serves, e.g. `["etcd", "etcds"]`.
    pub schemes: &'static [&'static str],
    /// One line for `anykv drivers`.
    pub description: &'static str,
    /// Query keys the driver reads, besides [`COMMON_PARAMS`].
    pub params: &'static [&'static str],
    /// Whether the URL path is the namespace (`etcd://h/app`) or a location
    /// the driver reads itself (`redb://dir/file.redb`).
    pub path_is_namespace: bool,
    /// The driver's capabilities.
    pub capabilities: fn() -> Capabilities,
    /// Connects; called with the parsed URL.
    pub open: OpenFn,
}

inventory::collect!(Driver);

/// Every linked driver, sorted by name.
pub fn drivers() -> Vec<&'static Driver> {
    let mut all: Vec<&'static Driver> = inventory::iter::<Driver>.into_iter().collect();
    all.sort_by_key(|d| d.name);
    all
}

/// The driver serving `scheme`.
pub fn driver_for(scheme: &str) -> Result<&'static Driver> {
    let all = drivers();
    all.iter()
        .find(|d| d.schemes.contains(&scheme))
        .copied()
        .ok_or_else(|| Error::UnknownBackend {
            name: scheme.to_owned(),
            available: all
                .iter()
                .flat_map(|d| d.schemes.iter().map(|s| s.to_string()))
                .collect(),
        })
}

/// Parses `url`, finds its driver, connects and wraps it in the standard
/// layers. See [`LayerConfig`] for the common query options.
pub async fn open(url: &str) -> Result<Kv> {
    builder(url).open().await
}

/// A builder for the store at `url`, to add, drop or replace layers before
/// [`open`](KvBuilder::open)ing it.
///
/// ```no_run
/// # async fn demo() -> anykv_core::Result<()> {
/// use anykv_core::{StandardLayer, layers::fail_fast::FailFastLayer};
/// let kv = anykv_core::builder("etcd://127.0.0.1:2379/app")
///     .layer(FailFastLayer::new())
///     .without(StandardLayer::Tracing)
///     .open()
///     .await?;
/// # let _ = kv; Ok(()) }
/// ```
pub fn builder(url: &str) -> KvBuilder {
    KvBuilder::from_url(url)
}

/// Everything [`open`] does before connecting: parse, find the driver,
/// validate options and work out the layer settings.
pub fn prepare(url: &str) -> Result<(&'static Driver, Config, LayerConfig)> {
    let mut config = Config::parse(url)?;
    let driver = driver_for(&config.scheme)?;
    let accepted: Vec<&str> = COMMON_PARAMS
        .iter()
        .chain(CHAOS_PARAMS)
        .chain(driver.params)
        .copied()
        .collect();
    config.check_params(&accepted)?;
    let namespace = match config.param("prefix") {
        Some(p) => p.to_owned(),
        None if driver.path_is_namespace => config.path.clone(),
        None => String::new(),
    };
    config.namespace = Prefix::new(namespace.trim_matches('/'))
        .map_err(|e| config.invalid(format!("namespace prefix: {e}")))?;
    let mut layers = LayerConfig {
        namespace: config.namespace.clone(),
        ..LayerConfig::default()
    };
    if let Some(t) = config.duration_param("timeout")? {
        if t.is_zero() {
            return Err(config.invalid("timeout must be positive"));
        }
        layers.timeout = t;
    }
    if let Some(r) = config.parse_param::<u32>("retries")? {
        layers.retry.max_attempts = r.saturating_add(1);
    }
    layers.probe_interval = positive(&config, "probe_interval")?;
    if let Some(i) = positive(&config, "liveness_interval")? {
        layers.liveness_interval = i;
    }
    layers.chaos = ChaosConfig::from_url(&config)?;
    Ok((driver, config, layers))
}

fn positive(config: &Config, key: &str) -> Result<Option<Duration>> {
    match config.duration_param(key)? {
        Some(d) if d.is_zero() => Err(config.invalid(format!("{key} must be positive"))),
        other => Ok(other),
    }
}
