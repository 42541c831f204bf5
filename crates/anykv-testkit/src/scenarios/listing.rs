//! list / keys / delete_prefix and the directory semantics of prefixes.

use std::time::Duration;

use anykv_core::{Bytes, Condition, Prefix, PutOptions, Store};

use crate::support::{Ctx, key, ok, prefix};

async fn put_all(cx: &Ctx, keys: &[&str]) {
    for k in keys {
        ok(
            "put",
            cx.kv
                .put(&key(k), Bytes::from(k.to_string()), PutOptions::default())
                .await,
        );
    }
}

fn names(pairs: &[anykv_core::KvPair]) -> Vec<&str> {
    pairs.iter().map(|p| p.key.as_str()).collect()
}

pub async fn list_is_directory_scoped_and_sorted(cx: Ctx) {
    put_all(&cx, &["a/z", "a/b/c", "ab", "ab/x", "a/a", "a-b", "a/b"]).await;
    let listed = ok("list a", cx.kv.list(&prefix("a")).await);
    assert_eq!(
        names(&listed),
        ["a/a", "a/b", "a/b/c", "a/z"],
        "list(a) holds a/… only, sorted"
    );
    for p in &listed {
        assert_eq!(
            p.value,
            Bytes::from(p.key.to_string()),
            "listed values match"
        );
    }
    let all = ok("list root", cx.kv.list(&Prefix::root()).await);
    assert_eq!(
        names(&all),
        ["a-b", "a/a", "a/b", "a/b/c", "a/z", "ab", "ab/x"],
        "sorted by key bytes"
    );
    assert!(ok("list missing", cx.kv.list(&prefix("nothing")).await).is_empty());
    assert_eq!(
        names(&ok("list leaf", cx.kv.list(&prefix("a/z")).await)),
        Vec::<&str>::new(),
        "a key's own prefix lists its children only"
    );
}

pub async fn keys_one_level(cx: Ctx) {
    put_all(&cx, &["k/a", "k/b/c", "k/b/d/e", "k/c", "kx/y"]).await;
    assert_eq!(
        ok("keys k", cx.kv.keys(&prefix("k")).await),
        ["a", "b", "c"]
    );
    assert_eq!(ok("keys k/b", cx.kv.keys(&prefix("k/b")).await), ["c", "d"]);
    assert_eq!(
        ok("keys root", cx.kv.keys(&Prefix::root()).await),
        ["k", "kx"]
    );
    assert!(ok("keys missing", cx.kv.keys(&prefix("zz")).await).is_empty());
}

pub async fn delete_prefix(cx: Ctx) {
    put_all(&cx, &["d/a", "d/b/c", "d", "dd/a", "e"]).await;
    assert_eq!(
        ok("delete_prefix d", cx.kv.delete_prefix(&prefix("d")).await),
        2
    );
    let left = ok("list root", cx.kv.list(&Prefix::root()).await);
    assert_eq!(
        names(&left),
        ["d", "dd/a", "e"],
        "only keys strictly below d/ are deleted"
    );
    assert_eq!(
        ok(
            "delete_prefix empty",
            cx.kv.delete_prefix(&prefix("nothing")).await
        ),
        0
    );
    ok(
        "delete_prefix root",
        cx.kv.delete_prefix(&Prefix::root()).await,
    );
    assert!(ok("list after root delete", cx.kv.list(&Prefix::root()).await).is_empty());
}

pub async fn parents_are_not_keys(cx: Ctx) {
    let kv = &cx.kv;
    put_all(&cx, &["p/q/r"]).await;
    assert_eq!(
        ok("get parent", kv.get(&key("p")).await),
        None,
        "an implicit parent is not a key"
    );
    assert_eq!(
        ok("get parent", kv.get(&key("p/q")).await),
        None,
        "an implicit parent is not a key"
    );
    assert!(!ok("exists parent", kv.exists(&key("p/q")).await));
    assert_eq!(names(&ok("list p", kv.list(&prefix("p")).await)), ["p/q/r"]);
    assert_eq!(
        ok("keys p", kv.keys(&prefix("p")).await),
        ["q"],
        "keys names the level even if it is only a parent"
    );
    assert!(
        !ok(
            "delete parent",
            kv.delete(&key("p/q"), Condition::Always).await
        ),
        "deleting an implicit parent deletes nothing"
    );
    assert!(ok("child survives", kv.exists(&key("p/q/r")).await));
    // Making the parent a key, then removing the child, keeps the parent.
    ok(
        "put parent",
        kv.put(&key("p/q"), Bytes::new(), PutOptions::default())
            .await,
    );
    assert_eq!(
        names(&ok("list p", kv.list(&prefix("p")).await)),
        ["p/q", "p/q/r"]
    );
    assert!(ok(
        "delete child",
        kv.delete(&key("p/q/r"), Condition::Always).await
    ));
    assert!(ok("parent key stays", kv.exists(&key("p/q")).await));
    assert!(ok(
        "delete parent key",
        kv.delete(&key("p/q"), Condition::Always).await
    ));
    assert!(ok("list p", kv.list(&prefix("p")).await).is_empty());
    // create-only on a former implicit parent works.
    put_all(&cx, &["m/n/o"]).await;
    ok(
        "create-only on implicit parent",
        kv.put(&key("m/n"), "v".into(), PutOptions::if_absent())
            .await,
    );
}

pub async fn list_under_concurrent_writers(cx: Ctx) {
    let stop = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for w in 0..3 {
        let kv = cx.kv.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u32;
            while tokio::time::Instant::now() < stop && n < 200 {
                let k = key(&format!("busy/w{w}/k{}", n % 20));
                kv.put(&k, Bytes::from(vec![b'v'; 64]), PutOptions::default())
                    .await
                    .map(|_| ())?;
                n += 1;
            }
            Ok::<u32, anykv_core::Error>(n)
        }));
    }
    let deleter = {
        let kv = cx.kv.clone();
        tokio::spawn(async move {
            let mut n = 0u32;
            while tokio::time::Instant::now() < stop && n < 200 {
                kv.delete_prefix(&prefix(&format!("busy/w{}", n % 3)))
                    .await?;
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<u32, anykv_core::Error>(n)
        })
    };
    let mut reads = 0;
    while tokio::time::Instant::now() < stop && reads < 200 {
        let listed = ok("list during writes", cx.kv.list(&prefix("busy")).await);
        let mut sorted = names(&listed);
        sorted.sort_unstable();
        assert_eq!(names(&listed), sorted, "list stays sorted under writes");
        assert!(listed.iter().all(|p| p.key.as_str().starts_with("busy/")));
        let k = ok("keys during writes", cx.kv.keys(&prefix("busy")).await);
        assert!(
            k.iter().all(|n| n.starts_with('w')),
            "keys are names one level down: {k:?}"
        );
        reads += 1;
    }
    for t in tasks {
        ok("writer", t.await.expect("writer task"));
    }
    ok("deleter", deleter.await.expect("deleter task"));
    assert!(reads > 0);
}
