//! The voltha `db.Backend` liveness tests (shared in `anykv_testkit::liveness`)
//! against a real ZooKeeper, a refused port and a hung port (accepts, never answers).

mod common;

use anykv_testkit::{liveness as voltha, server::silent_port};
use anykv_zookeeper as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_server_is_alive() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    voltha::live_server_is_alive(&url, &common::unique("live")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_port_is_not_alive_within_the_timeout() {
    voltha::refused_port_is_not_alive("zk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_server_is_not_alive_within_the_timeout() {
    voltha::hung_server_is_not_alive("zk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_prober_moves_liveness_without_traffic() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    voltha::prober_makes_alive(&url, &common::unique("prober")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_endpoint_keeps_not_alive_under_the_prober() {
    voltha::prober_keeps_dead_not_alive("zk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_against_a_dead_endpoint_are_bounded_and_redacted() {
    let port = silent_port().await;
    let url = format!("zk://alice:sup3rsecret@127.0.0.1:{port}/auth?timeout=1s&retries=0");
    voltha::secret_never_shown(&url, "sup3rsecret").await;
}
