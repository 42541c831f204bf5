//! The layers a [`Kv`](crate::Kv) is built from, one module each.
//!
//! Standard (in stack order, outermost first): [`namespace`], [`checks`],
//! [`trace`], [`liveness`], [`retry`], [`timeout`]. Optional: [`metrics`]
//! (cargo feature `metrics`), [`chaos`] (fault injection for tests,
//! also by URL), [`fail_fast`] (refuse at once while not alive).

pub mod chaos;
pub mod checks;
pub mod fail_fast;
pub mod liveness;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod namespace;
pub mod request;
pub mod retry;
#[cfg(test)]
pub(crate) mod test_store;
pub mod timeout;
pub mod trace;
pub(crate) mod unopened;
