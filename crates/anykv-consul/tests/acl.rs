//! ACLs, against the agent started with `acl.enabled`, `default_policy =
//! "deny"` and a known management token (`ANYKV_TEST_CONSUL_ACL`,
//! `ANYKV_TEST_CONSUL_ACL_TOKEN`).

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use anykv_consul as _;
use anykv_core::{ErrorKind, Key, LockOptions, PutOptions, Start, Store, Target};
use reqwest::Method;
use serde_json::json;

struct Acl {
    url: String,
    management: String,
}

fn acl() -> Option<Acl> {
    let url = common::url("ANYKV_TEST_CONSUL_ACL")?;
    let management = common::companion("ANYKV_TEST_CONSUL_ACL_TOKEN");
    Some(Acl { url, management })
}

/// Creates a token whose only policy is `rules`; returns its secret.
async fn token_with(acl: &Acl, name: &str, rules: &str) -> String {
    let (status, body) = common::http(
        Method::PUT,
        &acl.url,
        "acl/policy",
        Some(&acl.management),
        Some(json!({ "Name": common::unique(name).replace('/', "-"), "Rules": rules })),
    )
    .await;
    assert_eq!(status, 200, "create policy: {body}");
    let policy: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (status, body) = common::http(
        Method::PUT,
        &acl.url,
        "acl/token",
        Some(&acl.management),
        Some(json!({ "Policies": [{ "ID": policy["ID"] }] })),
    )
    .await;
    assert_eq!(status, 200, "create token: {body}");
    let token: serde_json::Value = serde_json::from_str(&body).unwrap();
    token["SecretID"].as_str().expect("SecretID").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_token_can_do_everything() {
    let Some(acl) = acl() else { return };
    let ns = common::unique("acl-admin");
    let kv = common::open(&acl.url, &ns, &format!("token={}", acl.management)).await;
    let k = Key::new("a").unwrap();
    let v = kv
        .put(&k, "1".into(), PutOptions::default())
        .await
        .expect("put");
    assert_eq!(kv.get(&k).await.expect("get").expect("present").version, v);
    let g = kv
        .try_lock(&Key::new("l").unwrap(), LockOptions::default())
        .await
        .expect("try_lock")
        .expect("free");
    g.release().await.expect("release");
    kv.delete_prefix(&anykv_core::Prefix::root())
        .await
        .expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_token_is_denied_writes_and_stays_alive() {
    let Some(acl) = acl() else { return };
    let ns = common::unique("acl-ro");
    let admin = common::open(&acl.url, &ns, &format!("token={}", acl.management)).await;
    let k = Key::new("k").unwrap();
    admin
        .put(&k, "v".into(), PutOptions::default())
        .await
        .expect("admin put");

    let token = token_with(&acl, "ro", r#"key_prefix "" { policy = "read" }"#).await;
    let ro = common::open(&acl.url, &ns, &format!("token={token}")).await;
    assert!(!ro.liveness().is_alive(), "not alive before any operation");
    let e = ro
        .put(&k, "w".into(), PutOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(!e.indicates_unreachable());
    assert!(
        ro.liveness().is_alive(),
        "a refusal proves the agent answered"
    );
    assert!(
        !format!("{e} {e:?} {ro:?}").contains(&token),
        "token leaked"
    );

    // Reads work; conditional writes and deletes are refused, not "conflicts".
    assert_eq!(
        &ro.get(&k).await.expect("get").expect("present").value[..],
        b"v"
    );
    for (what, r) in [
        (
            "create-only",
            ro.put(
                &Key::new("new").unwrap(),
                "x".into(),
                PutOptions::if_absent(),
            )
            .await
            .map(drop),
        ),
        (
            "delete",
            ro.delete(&k, anykv_core::Condition::Always).await.map(drop),
        ),
        (
            "atomic",
            ro.atomic(vec![], vec![anykv_core::Op::Put(k.clone(), "x".into())])
                .await
                .map(drop),
        ),
        (
            "lock",
            ro.try_lock(&Key::new("l").unwrap(), LockOptions::default())
                .await
                .map(drop),
        ),
    ] {
        let e = r.expect_err(what);
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{what}: {e}");
    }
    // A read-only token may watch.
    let _w = ro
        .watch(Target::Key(k.clone()), Start::Now)
        .await
        .expect("watch");
    assert!(ro.liveness().is_alive());
    assert_eq!(
        &ro.get(&k).await.unwrap().unwrap().value[..],
        b"v",
        "nothing written"
    );
    admin
        .delete_prefix(&anykv_core::Prefix::root())
        .await
        .expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_client_is_refused() {
    let Some(acl) = acl() else { return };
    let ns = common::unique("acl-anon");
    let anon = common::open(&acl.url, &ns, "").await;
    let k = Key::new("k").unwrap();
    let e = anon
        .put(&k, "v".into(), PutOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    let e = anon.get(&k).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    let e = match anon.watch(Target::Key(k), Start::Now).await {
        Ok(_) => panic!("an anonymous watch was accepted"),
        Err(e) => e,
    };
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(anon.liveness().is_alive());
    // The probe needs no permission: the agent is up.
    anon.probe().await.expect("probe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_token_is_unauthenticated() {
    let Some(acl) = acl() else { return };
    let bogus = "00000000-0000-4000-8000-000000000000";
    let kv = common::open(
        &acl.url,
        &common::unique("acl-bogus"),
        &format!("token={bogus}"),
    )
    .await;
    let e = kv.get(&Key::new("k").unwrap()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthenticated, "{e}");
    let e = kv
        .put(&Key::new("k").unwrap(), "v".into(), PutOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthenticated, "{e}");
    assert!(kv.liveness().is_alive());
    assert!(!format!("{e:?}").contains(bogus));
}
