//! put / get / delete / exists and versions.

use std::collections::HashSet;

use anykv_core::{Bytes, Condition, ErrorKind, PutOptions, Store, StoreExt};

use crate::support::{Ctx, err_kind, key, ok};

pub async fn put_get_delete_exists(cx: Ctx) {
    let kv = &cx.kv;
    let k = key("crud/a");
    assert_eq!(ok("get absent", kv.get(&k).await), None);
    assert!(!ok("exists absent", kv.exists(&k).await));
    let v = ok(
        "put",
        kv.put(&k, Bytes::from_static(b"one"), PutOptions::default())
            .await,
    );
    let got = ok("get", kv.get(&k).await).expect("key written");
    assert_eq!(got.key, k);
    assert_eq!(&got.value[..], b"one");
    assert_eq!(got.version, v, "get returns the version put returned");
    assert!(got.create_revision > 0 && got.mod_revision >= got.create_revision);
    assert!(ok("exists", kv.exists(&k).await));
    assert!(
        ok("delete", kv.delete(&k, Condition::Always).await),
        "delete of an existing key says true"
    );
    assert_eq!(ok("get deleted", kv.get(&k).await), None);
    assert!(
        !ok("delete again", kv.delete(&k, Condition::Always).await),
        "delete of an absent key says false"
    );
}

pub async fn overwrite_changes_version(cx: Ctx) {
    let kv = &cx.kv;
    let k = key("crud/over");
    let v1 = ok("put 1", kv.put(&k, "1".into(), PutOptions::default()).await);
    let first = ok("get 1", kv.get(&k).await).expect("exists");
    let v2 = ok("put 2", kv.put(&k, "2".into(), PutOptions::default()).await);
    let second = ok("get 2", kv.get(&k).await).expect("exists");
    assert_ne!(v1, v2, "an overwrite changes the version");
    assert_eq!(second.version, v2);
    assert_eq!(&second.value[..], b"2");
    assert_eq!(
        second.create_revision, first.create_revision,
        "an overwrite keeps the create revision"
    );
    assert!(
        second.mod_revision > first.mod_revision,
        "mod revision grows"
    );
}

pub async fn recreate_never_reuses_version(cx: Ctx) {
    let kv = &cx.kv;
    let k = key("crud/aba");
    let mut seen = HashSet::new();
    for round in 0..5 {
        let v = ok(
            "put",
            kv.put(&k, Bytes::from(format!("r{round}")), PutOptions::default())
                .await,
        );
        assert!(
            seen.insert(v),
            "version {v} reused after delete and re-create (round {round})"
        );
        ok("delete", kv.delete(&k, Condition::Always).await);
    }
    // The stale version of an earlier incarnation must not match a new one.
    let old = *seen.iter().next().expect("versions recorded");
    ok("put", kv.put(&k, "new".into(), PutOptions::default()).await);
    err_kind(
        "CAS with a version of an earlier incarnation",
        kv.put(&k, "x".into(), PutOptions::if_version(old)).await,
        ErrorKind::Conflict,
    );
}

pub async fn empty_value_is_a_key(cx: Ctx) {
    let kv = &cx.kv;
    let k = key("crud/empty");
    ok(
        "put empty",
        kv.put(&k, Bytes::new(), PutOptions::default()).await,
    );
    let got = ok("get empty", kv.get(&k).await).expect("an empty value is a key");
    assert!(got.value.is_empty());
    assert!(ok("exists", kv.exists(&k).await));
    let listed = ok("list", kv.list(&key("crud").as_prefix()).await);
    assert_eq!(listed.len(), 1, "an empty value is listed");
    err_kind(
        "create-only over an empty value",
        kv.put(&k, "x".into(), PutOptions::if_absent()).await,
        ErrorKind::AlreadyExists,
    );
}

pub async fn binary_and_large_values(cx: Ctx) {
    let kv = &cx.kv;
    let bin: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let k = key("crud/bin");
    ok(
        "put binary",
        kv.put(&k, Bytes::from(bin.clone()), PutOptions::default())
            .await,
    );
    assert_eq!(
        ok("get binary", kv.get(&k).await).expect("exists").value,
        bin
    );
    let big = vec![b'x'; (64 * 1024).min(cx.caps().max_value_size)];
    let k2 = key("crud/big");
    ok(
        "put 64 KiB",
        kv.put(&k2, Bytes::from(big.clone()), PutOptions::default())
            .await,
    );
    assert_eq!(
        ok("get 64 KiB", kv.get(&k2).await)
            .expect("exists")
            .value
            .len(),
        big.len()
    );
    // Unicode keys round-trip unchanged.
    let uk = key("crud/ünïcødé/ключ");
    ok(
        "put unicode key",
        kv.put(&uk, "u".into(), PutOptions::default()).await,
    );
    assert_eq!(
        ok("get unicode key", kv.get(&uk).await)
            .expect("exists")
            .key,
        uk
    );
}

pub async fn value_too_large(cx: Ctx) {
    let kv = &cx.kv;
    let max = cx.caps().max_value_size;
    let k = key("crud/huge");
    let e = err_kind(
        "put over max_value_size",
        kv.put(&k, Bytes::from(vec![0u8; max + 1]), PutOptions::default())
            .await,
        ErrorKind::ValueTooLarge,
    );
    assert_eq!(
        e.key(),
        Some("crud/huge"),
        "the error names the caller's key"
    );
    assert_eq!(
        ok("get after refused put", kv.get(&k).await),
        None,
        "nothing written"
    );
}

pub async fn typed_json_helpers(cx: Ctx) {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Limits {
        max: u32,
        name: String,
    }
    let kv = &cx.kv;
    let v = Limits {
        max: 7,
        name: "x".into(),
    };
    ok("put_json", kv.put_json("json/limits", &v).await);
    assert_eq!(
        ok("get_json", kv.get_json::<Limits>("json/limits").await),
        Some(v)
    );
    assert_eq!(
        ok("get_json absent", kv.get_json::<Limits>("json/none").await),
        None
    );
    ok("set", kv.set("json/raw", "not json").await);
    err_kind(
        "get_json of non-JSON",
        kv.get_json::<Limits>("json/raw").await,
        ErrorKind::Codec,
    );
    assert_eq!(
        &ok("get_or default", kv.get_or("json/none", "dflt").await)[..],
        b"dflt"
    );
}
