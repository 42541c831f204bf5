//! Key rules: every invalid form is rejected the same way, before any I/O.

use anykv_core::{ErrorKind, Key, MAX_KEY_LEN, Prefix, StoreExt};

use crate::support::{Ctx, err_kind, ok};

pub async fn invalid_keys_rejected_everywhere(cx: Ctx) {
    let long = "k".repeat(MAX_KEY_LEN + 1);
    let bad = [
        "",
        "/lead",
        "trail/",
        "a//b",
        ".",
        "..",
        "a/./b",
        "a/../b",
        "tab\there",
        "nl\n",
        "nul\0",
        "del\u{7f}",
        "__anykv",
        "__anykv/locks/x",
        long.as_str(),
    ];
    for b in bad {
        err_kind(
            &format!("Key::new({b:?})"),
            Key::new(b),
            ErrorKind::InvalidKey,
        );
        err_kind(
            &format!("set({b:?})"),
            cx.kv.set(b, "v").await,
            ErrorKind::InvalidKey,
        );
        err_kind(
            &format!("value({b:?})"),
            cx.kv.value(b).await,
            ErrorKind::InvalidKey,
        );
        if !b.is_empty() {
            err_kind(
                &format!("Prefix::new({b:?})"),
                Prefix::new(b),
                ErrorKind::InvalidKey,
            );
        }
    }
    // The longest valid key works end to end.
    let longest = "k".repeat(MAX_KEY_LEN);
    ok("set longest key", cx.kv.set(&longest, "v").await);
    assert_eq!(
        ok("value longest key", cx.kv.value(&longest).await).as_deref(),
        Some(&b"v"[..])
    );
    assert!(
        Prefix::new("").is_ok(),
        "the empty prefix is the namespace root"
    );
}
