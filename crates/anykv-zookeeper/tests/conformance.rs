//! The shared conformance suite, unchanged, against a real ZooKeeper
//! (`ANYKV_TEST_ZK`, set by `cargo xtask test`).

use anykv_zookeeper as _; // links the driver so `inventory` sees its registration

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance() {
    let Some(url) = anykv_testkit::server_url("ANYKV_TEST_ZK") else {
        return;
    };
    anykv_testkit::run_url("zookeeper", &url).await;
}
