//! The shared conformance suite against a real Consul agent
//! (`ANYKV_TEST_CONSUL`, started by `cargo xtask test`).

use anykv_consul as _; // links the driver so inventory sees its registration

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance() {
    let Some(url) = anykv_testkit::server_url("ANYKV_TEST_CONSUL") else {
        return;
    };
    anykv_testkit::run_url("consul", &url).await;
}
