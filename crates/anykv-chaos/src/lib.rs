//! The anykv fault suite: real etcd, ZooKeeper and Consul servers (single
//! nodes and three-member clusters) killed, frozen, restarted and
//! partitioned while checked workloads run against them through anykv.
//!
//! `cargo xtask chaos` runs every scenario; `cargo xtask test` runs a bounded
//! subset. Each scenario prints one table row and fails on any violation of
//! the contract (`docs/contract.md`, "Under faults"):
//!
//! - [`history`]: acknowledged writes kept; watch events neither invented,
//!   duplicated, reordered nor missing;
//! - [`linearizability`]: histories of concurrent get/put/CAS/delete on
//!   shared keys are linearizable (a timed-out operation may or may not
//!   have taken effect);
//! - [`locks`]: fenced counters across two processes;
//! - [`workload`]: every operation ends within its deadline;
//! - [`scenario`]: the faults, and on a single server a watch that reports
//!   the outage within 2 × timeout and liveness that goes and comes back.
//!
//! Servers come from `anykv-servers` (kill -9 and restart on the same data
//! dir and ports, SIGSTOP/SIGCONT, the leader); a partition puts an
//! `anykv_testkit::proxy` in front of every port of every member and
//! black-holes one member's traffic both ways (its own proxies, and what its
//! process sends through the others').

pub mod history;
pub mod linearizability;
pub mod locks;
pub mod report;
pub mod scenario;
pub mod workload;
