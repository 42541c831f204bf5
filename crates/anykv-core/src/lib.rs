//! The contract of anykv: one async key-value API over etcd, Consul,
//! ZooKeeper, redb and memory.
//!
//! - [`Store`]: the trait every driver implements (keys already namespaced).
//! - [`Kv`]: a driver wrapped in the standard layers (namespace, capability
//!   checks, tracing, liveness, retry, timeout); what applications hold.
//! - [`Layer`]: an interceptor that sees every operation as a [`Request`];
//!   [`builder`] / [`Kv::builder_for`] add, drop or replace layers;
//!   [`layers`] holds the standard ones, metrics, chaos and fail-fast.
//! - [`Key`] / [`Prefix`]: the key rules, checked before any network call.
//! - [`Error`]: one taxonomy for every backend.
//! - [`LivenessMonitor`]: the voltha-style liveness channel.
//! - [`registry`]: drivers register with `inventory`; [`open`] picks one by URL.
//!
//! Applications normally use the `anykv` facade crate, which re-exports all of this.

pub mod batch;
pub mod capability;
pub mod config;
pub mod election;
pub mod embedded;
pub mod error;
pub mod ext;
mod held_locks;
pub mod key;
pub mod layer;
pub mod layers;
pub mod liveness;
pub mod lock;
pub mod mirror;
pub mod registry;
pub mod session;
pub mod store;
pub mod types;

pub use capability::{Capabilities, SnapshotMode, WatchHistory};
pub use config::{Config, Secret};
pub use election::{CampaignOptions, Election, Leader, Leadership};
pub use error::{BoxError, Error, ErrorKind, NotSent, Result};
pub use ext::StoreExt;
pub use key::{Key, MAX_KEY_LEN, Prefix, RESERVED_ROOT};
pub use layer::{
    Context, ImportPairs, Kv, KvBuilder, Layer, LayerConfig, Next, OpKind, Request, Response,
    RetryPolicy, StandardLayer,
};
pub use liveness::LivenessMonitor;
pub use lock::{LockGuard, LockRelease, LostNotifier, LostSignal, lost_pair};
pub use mirror::{JsonChange, JsonMirror, Mirror};
pub use registry::{builder, drivers, open};
pub use session::{Session, SessionBackend, SessionOptions};
pub use store::{PairStream, Store, WatchStream};
pub use types::{
    Check, Condition, Event, KvPair, LockInfo, LockOptions, Op, PutOptions, Revision, Snapshot,
    Start, Target, Version,
};

// Re-exported so that driver crates and third parties use the same versions.
pub use async_trait::async_trait;
pub use bytes::Bytes;
pub use inventory;
