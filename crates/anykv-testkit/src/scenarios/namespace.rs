//! Stores with different namespace prefixes never see each other's keys.

use anykv_core::{Prefix, PutOptions, Store};

use crate::support::{Ctx, key, ok};

pub async fn namespaces_are_isolated(cx: Ctx) {
    let (one, two) = (cx.sibling("one"), cx.sibling("two"));
    let k = key("shared/name");
    ok(
        "put one",
        one.put(&k, "1".into(), PutOptions::default()).await,
    );
    ok(
        "put two",
        two.put(&k, "2".into(), PutOptions::default()).await,
    );
    assert_eq!(
        &ok("get one", one.get(&k).await).expect("exists").value[..],
        b"1"
    );
    assert_eq!(
        &ok("get two", two.get(&k).await).expect("exists").value[..],
        b"2"
    );
    let listed = ok("list one", one.list(&Prefix::root()).await);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, k, "keys come back without the namespace");
    assert_eq!(ok("keys one", one.keys(&Prefix::root()).await), ["shared"]);
    ok(
        "delete_prefix root of one",
        one.delete_prefix(&Prefix::root()).await,
    );
    assert!(ok("two untouched", two.exists(&k).await));
    // A namespace that is a string prefix of another stays separate.
    let (ab, a) = (cx.sibling("ab"), cx.sibling("a"));
    ok(
        "put ab",
        ab.put(&k, "ab".into(), PutOptions::default()).await,
    );
    assert!(ok("list a", a.list(&Prefix::root()).await).is_empty());
}
