//! The liveness monitor attached to every store.

use std::time::Duration;

use anykv_core::{ErrorKind, PutOptions, Store, StoreExt};
use futures::StreamExt;

use crate::support::{Ctx, err_kind, key, ok};

pub async fn starts_not_alive_then_alive(cx: Ctx) {
    let handle = cx.other_handle();
    let monitor = handle.liveness().clone();
    let mut states = monitor.subscribe();
    assert_eq!(
        states.next().await,
        Some(false),
        "not alive before any operation"
    );
    ok(
        "put",
        handle
            .put(&key("live/k"), "v".into(), PutOptions::default())
            .await,
    );
    let next = tokio::time::timeout(Duration::from_secs(5), states.next())
        .await
        .expect("a state is posted");
    assert_eq!(next, Some(true), "alive after a successful operation");
    err_kind(
        "bad key",
        handle.set("/bad", "v").await,
        ErrorKind::InvalidKey,
    );
    err_kind(
        "create-only conflict",
        handle
            .put(&key("live/k"), "v".into(), PutOptions::if_absent())
            .await,
        ErrorKind::AlreadyExists,
    );
    assert!(
        monitor.is_alive(),
        "errors that prove the backend answered keep it alive"
    );
    ok("probe", handle.probe().await);
    assert!(monitor.is_alive());
}
