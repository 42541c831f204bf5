//! [`LayerConfig`]: the settings of the standard layers.

use std::time::Duration;

use crate::{key::Prefix, layer::RetryPolicy, layers, liveness::DEFAULT_LIVENESS_INTERVAL};

/// Settings of the layers around a driver (from the URL's common options).
#[derive(Clone, Debug)]
pub struct LayerConfig {
    /// Namespace every key is scoped to.
    pub namespace: Prefix,
    /// Deadline of one attempt of one operation (`?timeout=`).
    pub timeout: Duration,
    /// Retry policy (`?retries=` sets `max_attempts - 1`).
    pub retry: RetryPolicy,
    /// Re-post period of the liveness monitor (`?liveness_interval=`).
    pub liveness_interval: Duration,
    /// Background probe period, off by default (`?probe_interval=`).
    pub probe_interval: Option<Duration>,
    /// Fault injection below the standard layers (`?chaos=…`, see
    /// [`ChaosConfig`](crate::layers::chaos::ChaosConfig)); off by default.
    pub chaos: Option<layers::chaos::ChaosConfig>,
}

impl Default for LayerConfig {
    fn default() -> Self {
        LayerConfig {
            namespace: Prefix::root(),
            timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            liveness_interval: DEFAULT_LIVENESS_INTERVAL,
            probe_interval: None,
            chaos: None,
        }
    }
}
