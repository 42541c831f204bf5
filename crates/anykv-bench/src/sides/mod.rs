//! The clients under test: anykv, and the raw etcd and ZooKeeper clients.

pub mod anykv;
pub mod etcd;
pub mod zk;

pub use anykv_testkit::server::endpoints;
