//! # anykv
//!
//! One async key-value API over etcd v3, Consul, ZooKeeper, an embedded redb
//! file and an in-memory store, with the backend chosen by URL at run time.
//!
//! ```
//! use anykv::{Key, PutOptions, Store, StoreExt, Target, Start};
//! use futures::StreamExt;
//!
//! # #[tokio::main] async fn main() -> anykv::Result<()> {
//! // `etcd://127.0.0.1:2379/app`, `consul://…`, `zk://…`, `redb://app.redb` work the same way.
//! let kv = anykv::open("memory://example/app").await?;
//!
//! let key = Key::new("config/greeting")?;
//! let v1 = kv.put(&key, "hello".into(), PutOptions::if_absent()).await?;
//! kv.put(&key, "hi".into(), PutOptions::if_version(v1)).await?; // compare-and-swap
//!
//! let mut changes = kv.watch(Target::Prefix(key.parent()), Start::Now).await?;
//! kv.set("config/mode", "fast").await?;
//! let event = changes.next().await.expect("an event")?;
//! assert_eq!(event.key().as_str(), "config/mode");
//!
//! let lock = kv.lock(&Key::new("locks/migrate")?, Default::default()).await?;
//! println!("fencing token {}", lock.fencing_token());
//! lock.release().await?;
//! # Ok(()) }
//! ```
//!
//! Layers: [`builder`] adds your own [`Layer`] (it sees every operation as
//! a [`Request`]), drops or replaces a standard one, and [`Kv::builder_for`]
//! wraps any [`Store`], a third-party driver included. [`layers`] holds the
//! standard layers and the optional ones: metrics (cargo feature
//! `metrics`), chaos (fault injection, also by URL: `memory://t?chaos_error_rate=0.1`)
//! and fail-fast.
//!
//! ```
//! use anykv::{StandardLayer, StoreExt, layers::{chaos::ChaosLayer, fail_fast::FailFastLayer}};
//!
//! # #[tokio::main] async fn main() -> anykv::Result<()> {
//! let chaos = ChaosLayer::new(7);
//! let switch = chaos.handle();
//! let kv = anykv::builder("memory://builder-demo")
//!     .layer(FailFastLayer::new())
//!     .layer_below(chaos)
//!     .without(StandardLayer::Tracing)
//!     .open()
//!     .await?;
//! kv.set("a", "1").await?;
//! switch.set_unreachable(true);
//! assert!(kv.set("a", "2").await.is_err());
//! # Ok(()) }
//! ```
//!
//! Drivers are picked with cargo features: `memory` and `redb` (default),
//! `etcd`, `consul`, `zookeeper`, or `full`. [`drivers()`] lists what is
//! linked. A third-party driver registers itself the same way the built-in
//! ones do (see [`registry`]) and is found by [`open`] once linked.

pub use anykv_core::*;

// Referencing each enabled driver crate links it, so that its `inventory`
// registration is seen by `drivers()` and `open()`.
#[cfg(feature = "consul")]
use anykv_consul as _;
#[cfg(feature = "etcd")]
use anykv_etcd as _;
#[cfg(feature = "memory")]
use anykv_memory as _;
#[cfg(feature = "redb")]
use anykv_redb as _;
#[cfg(feature = "zookeeper")]
use anykv_zookeeper as _;

/// Names of the drivers this build enables through cargo features.
pub const ENABLED_DRIVERS: &[&str] = &[
    #[cfg(feature = "consul")]
    "consul",
    #[cfg(feature = "etcd")]
    "etcd",
    #[cfg(feature = "memory")]
    "memory",
    #[cfg(feature = "redb")]
    "redb",
    #[cfg(feature = "zookeeper")]
    "zookeeper",
];

/// The README's Rust examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeExamples;
