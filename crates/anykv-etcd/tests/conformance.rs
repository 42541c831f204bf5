//! The shared conformance suite, unchanged, against a real etcd.

use anykv_etcd as _; // links the driver so inventory sees its registration

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance() {
    let Some(url) = anykv_testkit::server_url("ANYKV_TEST_ETCD") else {
        return;
    };
    anykv_testkit::run_url("etcd", &url).await;
}
