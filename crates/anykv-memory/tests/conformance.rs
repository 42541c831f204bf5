//! The conformance suite on the memory driver.

use anykv_memory as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance() {
    let report = anykv_testkit::run_url("memory", "memory://conformance").await;
    assert_eq!(report.executed, anykv_testkit::scenarios().len());
}
