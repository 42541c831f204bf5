//! Conditional writes: create-only, update-only, CAS, compare-and-delete.

use anykv_core::{Bytes, Condition, Error, ErrorKind, PutOptions, Store, Version};

use crate::support::{Ctx, err_kind, key, ok};

pub async fn create_only_on_existing(cx: Ctx) {
    let kv = &cx.kv;
    let k = key("cond/create");
    let v = ok(
        "create",
        kv.put(&k, "a".into(), PutOptions::if_absent()).await,
    );
    let e = err_kind(
        "create existing",
        kv.put(&k, "b".into(), PutOptions::if_absent()).await,
        ErrorKind::AlreadyExists,
    );
    assert_eq!(e.key(), Some("cond/create"));
    let got = ok("get", kv.get(&k).await).expect("exists");
    assert_eq!(
        (&got.value[..], got.version),
        (&b"a"[..], v),
        "failed create changed nothing"
    );
}

pub async fn update_only_on_missing(cx: Ctx) {
    let kv = &cx.kv;
    let k = key("cond/update");
    err_kind(
        "update missing",
        kv.put(&k, "a".into(), PutOptions::if_present()).await,
        ErrorKind::NotFound,
    );
    assert_eq!(
        ok("get", kv.get(&k).await),
        None,
        "failed update created nothing"
    );
    ok(
        "create",
        kv.put(&k, "a".into(), PutOptions::default()).await,
    );
    ok(
        "update existing",
        kv.put(&k, "b".into(), PutOptions::if_present()).await,
    );
    assert_eq!(
        &ok("get", kv.get(&k).await).expect("exists").value[..],
        b"b"
    );
}

pub async fn compare_and_swap(cx: Ctx) {
    let kv = &cx.kv;
    let k = key("cond/cas");
    err_kind(
        "CAS on missing",
        kv.put(&k, "x".into(), PutOptions::if_version(Version::new(1)))
            .await,
        ErrorKind::NotFound,
    );
    let v1 = ok("put", kv.put(&k, "1".into(), PutOptions::default()).await);
    let v2 = ok(
        "CAS current",
        kv.put(&k, "2".into(), PutOptions::if_version(v1)).await,
    );
    assert_ne!(v1, v2);
    match kv.put(&k, "3".into(), PutOptions::if_version(v1)).await {
        Err(Error::Conflict { key, expected, .. }) => {
            assert_eq!(key, "cond/cas");
            assert_eq!(expected, Some(v1));
        }
        other => panic!("CAS with stale version: expected Conflict, got {other:?}"),
    }
    assert_eq!(
        &ok("get", kv.get(&k).await).expect("exists").value[..],
        b"2",
        "failed CAS changed nothing"
    );
}

pub async fn compare_and_delete(cx: Ctx) {
    let kv = &cx.kv;
    let k = key("cond/cad");
    err_kind(
        "delete IfPresent on missing",
        kv.delete(&k, Condition::IfPresent).await,
        ErrorKind::NotFound,
    );
    err_kind(
        "delete IfVersion on missing",
        kv.delete(&k, Condition::IfVersion(Version::new(1))).await,
        ErrorKind::NotFound,
    );
    err_kind(
        "delete IfAbsent",
        kv.delete(&k, Condition::IfAbsent).await,
        ErrorKind::InvalidArgument,
    );
    let v1 = ok("put", kv.put(&k, "1".into(), PutOptions::default()).await);
    let v2 = ok("put", kv.put(&k, "2".into(), PutOptions::default()).await);
    err_kind(
        "delete stale version",
        kv.delete(&k, Condition::IfVersion(v1)).await,
        ErrorKind::Conflict,
    );
    assert!(ok("exists after failed delete", kv.exists(&k).await));
    assert!(ok(
        "delete current version",
        kv.delete(&k, Condition::IfVersion(v2)).await
    ));
    assert!(!ok("exists", kv.exists(&k).await));
    ok("put", kv.put(&k, "3".into(), PutOptions::default()).await);
    assert!(ok(
        "delete IfPresent",
        kv.delete(&k, Condition::IfPresent).await
    ));
}

pub async fn concurrent_cas_one_winner(cx: Ctx) {
    let k = key("cond/race");
    let v0 = ok(
        "put",
        cx.kv.put(&k, "0".into(), PutOptions::default()).await,
    );
    let mut tasks = Vec::new();
    for i in 0..20 {
        let kv = if i % 2 == 0 {
            cx.kv.clone()
        } else {
            cx.other_handle()
        };
        let k = k.clone();
        tasks.push(tokio::spawn(async move {
            kv.put(&k, Bytes::from(format!("w{i}")), PutOptions::if_version(v0))
                .await
        }));
    }
    let (mut wins, mut conflicts) = (0, 0);
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => wins += 1,
            Err(e) if e.kind() == ErrorKind::Conflict => conflicts += 1,
            Err(e) => panic!("CAS race: unexpected error {e}"),
        }
    }
    assert_eq!(
        (wins, conflicts),
        (1, 19),
        "exactly one of 20 CAS from the same version wins"
    );
}
