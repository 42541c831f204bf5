//! The shared conformance suite on a fresh redb file (no server needed).

use anykv_redb as _; // links the driver so the registry sees it

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("redb://{}", dir.path().join("conformance.redb").display());
    let report = anykv_testkit::run_url("redb", &url).await;
    assert_eq!(
        report.executed,
        anykv_testkit::scenarios().len(),
        "every scenario ran"
    );
}
