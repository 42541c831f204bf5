//! `consuls://`: a private agent serving HTTPS with a CA made by the
//! `consul tls` commands of the same binary.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::{path::PathBuf, process::Command, time::Duration};

use anykv_consul as _;
use anykv_core::{Key, LockOptions, Prefix, PutOptions, Start, Store, Target};
use futures::StreamExt;

/// A CA and a server certificate for 127.0.0.1 (`consul tls ca/cert create`).
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn create(bin: &str) -> Certs {
        let dir = std::env::temp_dir().join(common::unique("tls").replace('/', "-"));
        std::fs::create_dir_all(&dir).unwrap();
        for args in [
            &["tls", "ca", "create"][..],
            &["tls", "cert", "create", "-server", "-dc", "dc1"],
        ] {
            let out = Command::new(bin)
                .args(args)
                .current_dir(&dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "consul {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Certs { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consuls_scheme_talks_https_with_a_private_ca() {
    if common::url("ANYKV_TEST_CONSUL").is_none() {
        return;
    }
    let bin = common::companion("ANYKV_CONSUL_BIN");
    let certs = Certs::create(&bin);
    let https = common::free_port();
    let hcl = |s: String| ["-hcl".to_owned(), s];
    let extra: Vec<String> = [
        hcl(format!("ports {{ https = {https} }}")),
        hcl(format!(
            "ca_file = \"{}\"",
            certs.path("consul-agent-ca.pem")
        )),
        hcl(format!(
            "cert_file = \"{}\"",
            certs.path("dc1-server-consul-0.pem")
        )),
        hcl(format!(
            "key_file = \"{}\"",
            certs.path("dc1-server-consul-0-key.pem")
        )),
    ]
    .concat();
    let _agent = common::PrivateAgent::start_with(&bin, &extra).await;
    let ca = certs.path("consul-agent-ca.pem");

    let url = format!("consuls://127.0.0.1:{https}/tls?ca_file={ca}&timeout=3s");
    let kv = anykv_core::open(&url).await.expect("open consuls://");
    kv.probe().await.expect("probe over https");
    let k = Key::new("k").unwrap();
    let mut w = kv
        .watch(Target::Prefix(Prefix::root()), Start::Now)
        .await
        .expect("watch");
    let v = kv
        .put(&k, "v".into(), PutOptions::default())
        .await
        .expect("put over https");
    assert_eq!(kv.get(&k).await.unwrap().unwrap().version, v);
    let ev = tokio::time::timeout(Duration::from_secs(15), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.key(), &k);
    let g = kv
        .try_lock(&k, LockOptions::default())
        .await
        .unwrap()
        .expect("lock");
    g.release().await.unwrap();

    // Without the CA the server is not trusted: nothing is sent, and the
    // error says the agent cannot be reached (securely).
    let untrusted = anykv_core::open(&format!(
        "consuls://127.0.0.1:{https}/tls?timeout=3s&retries=0&token=s3cret"
    ))
    .await
    .unwrap();
    let e = untrusted.get(&k).await.unwrap_err();
    assert!(e.indicates_unreachable(), "{e}");
    assert!(!format!("{e} {e:?} {untrusted:?}").contains("s3cret"));
    // Plain HTTP against the HTTPS port is refused too.
    let plain = anykv_core::open(&format!(
        "consul://127.0.0.1:{https}/tls?timeout=3s&retries=0"
    ))
    .await
    .unwrap();
    assert!(plain.get(&k).await.is_err());
}

#[tokio::test]
async fn ca_file_is_checked_when_opening() {
    let e = anykv_core::open("consuls://127.0.0.1:1/x?ca_file=/nonexistent/ca.pem")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), anykv_core::ErrorKind::InvalidUrl, "{e}");
    assert!(e.to_string().contains("ca_file"), "{e}");
    let e = anykv_core::open("consul://127.0.0.1:1/x?ca_file=/etc/hostname")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), anykv_core::ErrorKind::InvalidUrl, "{e}");
}
