//! The registry sees every driver the enabled features link, and the facade
//! reports URL and scheme problems as typed errors.

use anykv::{Error, ErrorKind, Store, StoreExt};

#[test]
fn every_enabled_driver_is_registered() {
    let linked: Vec<&str> = anykv::drivers().iter().map(|d| d.name).collect();
    for name in anykv::ENABLED_DRIVERS {
        assert!(
            linked.contains(name),
            "driver {name} is enabled but not registered: {linked:?}"
        );
    }
}

#[tokio::test]
async fn unknown_scheme_lists_available() {
    match anykv::open("nosuch://x").await {
        Err(Error::UnknownBackend { name, available }) => {
            assert_eq!(name, "nosuch");
            assert!(available.iter().any(|s| s == "memory"), "{available:?}");
        }
        other => panic!("expected UnknownBackend, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_urls_are_invalid_url() {
    for url in [
        "no-scheme",
        "memory://x?bogus=1",
        "memory://x?timeout=fast",
        "memory://x?timeout=0s",
        "memory://x?prefix=a//b",
        "memory://x?retries=-1",
    ] {
        match anykv::open(url).await {
            Err(e) => assert_eq!(e.kind(), ErrorKind::InvalidUrl, "{url}: {e}"),
            Ok(_) => panic!("{url}: expected InvalidUrl"),
        }
    }
    let e = anykv::open("memory://x?bogus=1")
        .await
        .expect_err("unknown option");
    let msg = e.to_string();
    assert!(
        msg.contains("\"bogus\"") && msg.contains("timeout"),
        "names the key and the accepted ones: {msg}"
    );
}

#[tokio::test]
async fn secrets_never_shown() {
    let e = anykv::open("nosuch://user:hunter2@h:1/?token=s3cr3t")
        .await
        .expect_err("unknown");
    let _ = e;
    let e = anykv::open("memory://user:hunter2@x/?token=s3cr3t")
        .await
        .expect_err("unknown option token");
    let shown = format!("{e} {e:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("s3cr3t"),
        "{shown}"
    );
}

#[tokio::test]
async fn memory_name_shares_one_store() {
    let a = anykv::open("memory://shared-facade").await.expect("open");
    let b = anykv::open("memory://shared-facade").await.expect("open");
    let c = anykv::open("memory://").await.expect("open");
    a.set("k", "v").await.expect("set");
    assert_eq!(b.value("k").await.expect("get").as_deref(), Some(&b"v"[..]));
    assert_eq!(
        c.value("k").await.expect("get"),
        None,
        "memory:// without a name is private"
    );
    let scoped = anykv::open("memory://shared-facade/app")
        .await
        .expect("open");
    assert_eq!(
        scoped.value("k").await.expect("get"),
        None,
        "the path is a namespace"
    );
    assert_eq!(scoped.backend(), "memory");
}
