//! export / import between two stores.

use anykv_core::{Bytes, Prefix, PutOptions, Store};

use crate::support::{Ctx, key, ok, prefix};

pub async fn export_import_round_trip(cx: Ctx) {
    let (src, dst) = (cx.sibling("src"), cx.sibling("dst"));
    let mut written = Vec::new();
    for i in 0..25 {
        let k = key(&format!("data/{}/item{i:02}", i % 3));
        let v = if i == 7 {
            Bytes::new()
        } else {
            Bytes::from(vec![i as u8; 100 + i])
        };
        ok("put", src.put(&k, v.clone(), PutOptions::default()).await);
        written.push((k, v));
    }
    ok(
        "put outside",
        src.put(&key("other"), "x".into(), PutOptions::default())
            .await,
    );
    let stream = ok("export", src.export(&prefix("data")).await);
    assert_eq!(
        ok("import", dst.import(stream).await),
        25,
        "import counts what it wrote"
    );
    let copied: Vec<(String, Bytes)> = ok("list dst", dst.list(&Prefix::root()).await)
        .into_iter()
        .map(|p| (p.key.to_string(), p.value))
        .collect();
    written.sort_by(|a, b| a.0.cmp(&b.0));
    let want: Vec<(String, Bytes)> = written
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    assert_eq!(copied, want, "export then import reproduces the data");
    // Import again overwrites in place.
    let stream = ok("export again", src.export(&prefix("data/1")).await);
    assert_eq!(ok("import again", dst.import(stream).await), 8);
    assert_eq!(ok("list dst", dst.list(&Prefix::root()).await).len(), 25);
}
