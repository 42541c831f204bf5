//! atomic(): all-or-nothing multi-key commits with preconditions.

use anykv_core::{Bytes, Check, ErrorKind, Op, PutOptions, Store};

use crate::support::{Ctx, err_kind, key, ok};

async fn setup(cx: &Ctx) -> anykv_core::Version {
    ok(
        "put a",
        cx.kv
            .put(&key("tx/a"), "1".into(), PutOptions::default())
            .await,
    );
    ok(
        "put b",
        cx.kv
            .put(&key("tx/b"), "2".into(), PutOptions::default())
            .await,
    );
    ok("get a", cx.kv.get(&key("tx/a")).await)
        .expect("a")
        .version
}

pub async fn commit_when_all_checks_hold(cx: Ctx) {
    let va = setup(&cx).await;
    let checks = vec![
        Check::Exists(key("tx/a")),
        Check::Absent(key("tx/c")),
        Check::Version(key("tx/a"), va),
        Check::Value(key("tx/b"), Bytes::from_static(b"2")),
    ];
    let ops = vec![
        Op::Put(key("tx/c"), "3".into()),
        Op::Delete(key("tx/a")),
        Op::Put(key("tx/b"), "22".into()),
        Op::Put(key("tx/deep/d"), Bytes::new()),
    ];
    let rev = ok("atomic", cx.kv.atomic(checks, ops).await);
    assert_eq!(ok("get a", cx.kv.get(&key("tx/a")).await), None);
    let b = ok("get b", cx.kv.get(&key("tx/b")).await).expect("b");
    let c = ok("get c", cx.kv.get(&key("tx/c")).await).expect("c");
    assert_eq!((&b.value[..], &c.value[..]), (&b"22"[..], &b"3"[..]));
    assert_eq!(b.mod_revision, c.mod_revision, "one commit, one revision");
    assert_eq!(b.mod_revision, rev, "atomic returns the commit revision");
    assert!(ok("get d", cx.kv.get(&key("tx/deep/d")).await).is_some());
    ok(
        "atomic with no ops",
        cx.kv.atomic(vec![Check::Exists(key("tx/b"))], vec![]).await,
    );
}

pub async fn nothing_written_when_a_check_fails(cx: Ctx) {
    let va = setup(&cx).await;
    let stale = ok(
        "bump a",
        cx.kv
            .put(&key("tx/a"), "1".into(), PutOptions::default())
            .await,
    );
    assert_ne!(stale, va);
    let failing = [
        Check::Exists(key("tx/missing")),
        Check::Absent(key("tx/a")),
        Check::Version(key("tx/a"), va),
        Check::Version(key("tx/missing"), va),
        Check::Value(key("tx/b"), Bytes::from_static(b"other")),
        Check::Value(key("tx/missing"), Bytes::from_static(b"2")),
    ];
    for check in failing {
        let what = format!("atomic with failing {check:?}");
        let ops = vec![Op::Put(key("tx/c"), "3".into()), Op::Delete(key("tx/b"))];
        let e = err_kind(
            &what,
            cx.kv
                .atomic(vec![Check::Exists(key("tx/b")), check.clone()], ops)
                .await,
            ErrorKind::Conflict,
        );
        assert!(
            e.key().is_some_and(|k| k.starts_with("tx/")),
            "{what}: error names a caller key: {e}"
        );
        assert_eq!(
            ok("get c", cx.kv.get(&key("tx/c")).await),
            None,
            "{what}: a put was applied"
        );
        assert!(
            ok("get b", cx.kv.exists(&key("tx/b")).await),
            "{what}: a delete was applied"
        );
    }
}

pub async fn limits_and_duplicates(cx: Ctx) {
    let dup = vec![Op::Put(key("tx/x"), "1".into()), Op::Delete(key("tx/x"))];
    err_kind(
        "same key twice",
        cx.kv.atomic(vec![], dup).await,
        ErrorKind::InvalidArgument,
    );
    let max = cx.caps().max_value_size;
    err_kind(
        "value too large inside atomic",
        cx.kv
            .atomic(
                vec![],
                vec![Op::Put(key("tx/big"), Bytes::from(vec![0; max + 1]))],
            )
            .await,
        ErrorKind::ValueTooLarge,
    );
    if let Some(limit) = cx.caps().max_atomic_ops {
        let ops: Vec<Op> = (0..=limit)
            .map(|i| Op::Put(key(&format!("tx/many/{i}")), "v".into()))
            .collect();
        err_kind(
            "over max_atomic_ops",
            cx.kv.atomic(vec![], ops).await,
            ErrorKind::InvalidArgument,
        );
        let ops: Vec<Op> = (0..limit)
            .map(|i| Op::Put(key(&format!("tx/many/{i}")), "v".into()))
            .collect();
        ok("exactly max_atomic_ops", cx.kv.atomic(vec![], ops).await);
    } else {
        let ops: Vec<Op> = (0..100)
            .map(|i| Op::Put(key(&format!("tx/many/{i}")), "v".into()))
            .collect();
        ok("100 ops", cx.kv.atomic(vec![], ops).await);
    }
    assert!(ok("many written", cx.kv.exists(&key("tx/many/0")).await));
}
