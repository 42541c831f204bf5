//! A driver from a crate anykv knows nothing about registers itself and is
//! opened by URL, wrapped in the same layers as the built-in drivers.

use anykv::{ErrorKind, Key, LockOptions, Prefix, PutOptions, Start, Store, StoreExt, Target};
use anykv_toy_driver as _;

#[tokio::test]
async fn third_party_driver_is_found_and_layered() {
    assert!(
        anykv::drivers()
            .iter()
            .any(|d| d.name == "toy" && d.schemes == ["toy"]),
        "toy driver registered"
    );
    let kv = anykv::open("toy://anywhere/ns?flavour=mint&timeout=2s")
        .await
        .expect("open toy");
    assert_eq!(kv.backend(), "toy");
    kv.set("a/b", "v").await.expect("set");
    assert_eq!(
        kv.value("a/b").await.expect("get").as_deref(),
        Some(&b"v"[..])
    );
    assert_eq!(
        kv.keys(&Prefix::root())
            .await
            .expect("keys (derived from list)"),
        ["a"]
    );
    let big = vec![0u8; 2048];
    let e = kv
        .put(
            &Key::new("big").expect("key"),
            big.into(),
            PutOptions::default(),
        )
        .await
        .expect_err("too large");
    assert_eq!(
        e.kind(),
        ErrorKind::ValueTooLarge,
        "the layer enforces the driver's declared max"
    );
    let e = kv
        .lock(&Key::new("l").expect("key"), LockOptions::default())
        .await
        .expect_err("no locks");
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    let e = kv
        .put(
            &Key::new("t").expect("key"),
            "v".into(),
            PutOptions::default().with_ttl(std::time::Duration::from_secs(1)),
        )
        .await
        .expect_err("no ttl");
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    match kv.watch(Target::Prefix(Prefix::root()), Start::Now).await {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Unsupported),
        Ok(_) => panic!("watch on a driver without watch must be Unsupported"),
    }
    assert!(
        kv.liveness().is_alive(),
        "successful operations made it alive"
    );
}

#[tokio::test]
async fn third_party_options_are_checked() {
    let e = anykv::open("toy://x?colour=red")
        .await
        .expect_err("unknown option");
    assert_eq!(e.kind(), ErrorKind::InvalidUrl);
    assert!(
        e.to_string().contains("flavour"),
        "accepted options listed: {e}"
    );
}
