//! Keys with a time to live.

use std::time::Duration;

use anykv_core::{ErrorKind, PutOptions, Store};

use crate::support::{Ctx, err_kind, eventually, key, ok};

pub async fn ttl_expires_or_unsupported(cx: Ctx) {
    let kv = &cx.kv;
    let k = key("ttl/short");
    let ttl = Duration::from_secs(1);
    let Some(granularity) = cx.caps().ttl else {
        err_kind(
            "put with ttl on a backend without TTL",
            kv.put(&k, "x".into(), PutOptions::default().with_ttl(ttl))
                .await,
            ErrorKind::Unsupported,
        );
        assert_eq!(
            ok("get", kv.get(&k).await),
            None,
            "a refused TTL put writes nothing"
        );
        return;
    };
    err_kind(
        "zero ttl",
        kv.put(
            &k,
            "x".into(),
            PutOptions::default().with_ttl(Duration::ZERO),
        )
        .await,
        ErrorKind::InvalidArgument,
    );
    ok(
        "put with ttl",
        kv.put(&k, "x".into(), PutOptions::default().with_ttl(ttl))
            .await,
    );
    ok(
        "put without ttl",
        kv.put(&key("ttl/keep"), "y".into(), PutOptions::default())
            .await,
    );
    assert!(ok("exists right after put", kv.exists(&k).await));
    // A backend may round a short TTL up to its minimum: the bound is the
    // declared granularity, which includes that.
    let limit = ttl + granularity + Duration::from_secs(3);
    eventually("ttl key disappears", limit, || async {
        matches!(kv.get(&k).await, Ok(None))
    })
    .await;
    assert!(
        ok("list", kv.list(&key("ttl").as_prefix()).await)
            .iter()
            .all(|p| p.key != k),
        "expired key not listed"
    );
    assert!(ok(
        "key without ttl stays",
        kv.exists(&key("ttl/keep")).await
    ));
    // Overwriting without a TTL makes the key permanent again.
    ok(
        "put ttl",
        kv.put(&k, "x".into(), PutOptions::default().with_ttl(ttl))
            .await,
    );
    ok(
        "overwrite without ttl",
        kv.put(&k, "z".into(), PutOptions::default()).await,
    );
    tokio::time::sleep(limit).await;
    assert!(
        ok("overwritten key stays", kv.exists(&k).await),
        "a put without ttl clears the old ttl"
    );
}
