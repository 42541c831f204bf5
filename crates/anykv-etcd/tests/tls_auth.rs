//! `etcds://` with mutual TLS and user/password auth, against an etcd this
//! test starts itself (from ANYKV_ETCD_BIN, exported by `cargo xtask test`)
//! with certificates it makes at run time.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anykv_core::{ErrorKind, Key, LockOptions, Prefix, PutOptions, Start, Store, Target};
use anykv_etcd as _;
use etcd_client::{Certificate, ConnectOptions, Identity, Permission, TlsOptions};
use futures::StreamExt;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::time::{Instant, timeout};

const ROOT_PW: &str = "r00t-secret-pw";
const APP_PW: &str = "app-secret-pw";

/// The etcd process, killed when the test ends (also on panic).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, a server certificate for 127.0.0.1 and `etcd.test`, and a client certificate.
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "anykv test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
            let mut p = CertificateParams::new(names).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.extended_key_usages = vec![usage];
            p.use_authority_key_identifier_extension = true;
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server, server_key) = leaf(
            vec!["127.0.0.1".into(), "etcd.test".into()],
            "etcd.test",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client, client_key) = leaf(
            vec!["anykv-client".into()],
            "anykv-client",
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        for (name, pem) in [
            ("ca.pem", ca_cert.pem()),
            ("server.pem", server),
            ("server-key.pem", server_key),
            ("client.pem", client),
            ("client-key.pem", client_key),
        ] {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    /// The URL query that points anykv at these files.
    fn query(&self) -> String {
        format!(
            "ca={}&cert={}&key={}",
            self.path("ca.pem").display(),
            self.path("client.pem").display(),
            self.path("client-key.pem").display()
        )
    }

    fn raw_tls(&self) -> TlsOptions {
        TlsOptions::new()
            .ca_certificate(Certificate::from_pem(self.read("ca.pem")))
            .identity(Identity::from_pem(
                self.read("client.pem"),
                self.read("client-key.pem"),
            ))
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_etcd(bin: &str, pki: &Pki, data: &Path) -> (Server, u16) {
    let (client, peer) = (free_port(), free_port());
    let client_url = format!("https://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new(bin)
        .arg("--name=tls")
        .arg(format!("--data-dir={}", data.display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=tls={peer_url}"))
        .arg(format!("--cert-file={}", pki.path("server.pem").display()))
        .arg(format!(
            "--key-file={}",
            pki.path("server-key.pem").display()
        ))
        .arg(format!(
            "--trusted-ca-file={}",
            pki.path("ca.pem").display()
        ))
        .arg("--client-cert-auth")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start etcd");
    (Server(child), client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_and_password_auth() {
    if common::url("ANYKV_TEST_ETCD").is_none() {
        return;
    }
    let bin = common::companion("ANYKV_ETCD_BIN");
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let (_server, port) = start_etcd(&bin, &pki, data.path());
    let endpoint = format!("127.0.0.1:{port}");

    // Wait for the server, through TLS.
    let raw_opts = ConnectOptions::new().with_tls(pki.raw_tls());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut raw = loop {
        if let Ok(mut c) =
            etcd_client::Client::connect([format!("https://{endpoint}")], Some(raw_opts.clone()))
                .await
            && timeout(Duration::from_secs(2), c.status())
                .await
                .is_ok_and(|r| r.is_ok())
        {
            break c;
        }
        assert!(Instant::now() < deadline, "TLS etcd did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Users: root, and "app" allowed only under app/.
    raw.user_add("root", ROOT_PW, None).await.unwrap();
    raw.role_add("root").await.unwrap();
    raw.user_grant_role("root", "root").await.unwrap();
    raw.user_add("app", APP_PW, None).await.unwrap();
    raw.role_add("app").await.unwrap();
    raw.role_grant_permission("app", Permission::read_write("app/").with_prefix())
        .await
        .unwrap();
    raw.user_grant_role("app", "app").await.unwrap();
    raw.auth_enable().await.unwrap();

    let base = format!("etcds://{endpoint}");
    let q = pki.query();

    // Root over mutual TLS: the whole API works.
    let url = format!("etcds://root:{ROOT_PW}@{endpoint}/tls?{q}&timeout=3s");
    let kv = anykv_core::open(&url).await.expect("open as root");
    assert!(!format!("{kv:?}").contains(ROOT_PW));
    let k = Key::new("k").unwrap();
    let mut w = kv.watch(Target::Key(k.clone()), Start::Now).await.unwrap();
    let v = kv.put(&k, "v".into(), PutOptions::default()).await.unwrap();
    assert_eq!(kv.get(&k).await.unwrap().unwrap().version, v);
    let ev = timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.revision(), v.get());
    let guard = kv.lock(&k, LockOptions::default()).await.unwrap();
    guard.release().await.unwrap();
    kv.put(
        &k,
        "t".into(),
        PutOptions::default().with_ttl(Duration::from_secs(5)),
    )
    .await
    .unwrap();

    // The server name can be overridden to match the certificate.
    let named = format!("etcds://root:{ROOT_PW}@{endpoint}/tls?{q}&domain=etcd.test&timeout=3s");
    let kv2 = anykv_core::open(&named).await.unwrap();
    kv2.probe().await.expect("domain matching the certificate");
    let wrong =
        format!("etcds://root:{ROOT_PW}@{endpoint}/tls?{q}&domain=wrong.test&timeout=2s&retries=0");
    match anykv_core::open(&wrong).await {
        Err(e) => {
            eprintln!("tls: name mismatch at open: {e}");
            assert!(!format!("{e} {e:?}").contains(ROOT_PW));
        }
        Ok(kv3) => {
            let e = kv3
                .probe()
                .await
                .expect_err("certificate name mismatch must fail");
            eprintln!("tls: name mismatch at probe: {e}");
            assert!(!format!("{e} {e:?}").contains(ROOT_PW));
        }
    }

    // A wrong password fails at open, as Unauthenticated, without the password.
    let bad = format!("etcds://root:not-the-pw@{endpoint}/tls?{q}&timeout=3s");
    let e = anykv_core::open(&bad).await.expect_err("wrong password");
    assert_eq!(e.kind(), ErrorKind::Unauthenticated, "{e}");
    assert!(!format!("{e} {e:?}").contains("not-the-pw"));
    assert!(!e.indicates_unreachable());

    // No credentials on an auth-enabled cluster: refused, but the server answered.
    let anon = anykv_core::open(&format!("{base}/tls?{q}&timeout=3s"))
        .await
        .unwrap();
    let e = anon
        .put(&k, "x".into(), PutOptions::default())
        .await
        .expect_err("anonymous write");
    eprintln!("tls: anonymous write: {e}");
    assert!(
        matches!(
            e.kind(),
            ErrorKind::Unauthenticated | ErrorKind::PermissionDenied
        ),
        "{e}"
    );
    assert!(
        anon.liveness().is_alive(),
        "an auth refusal proves the server is up"
    );

    // A user limited to app/: PermissionDenied elsewhere, and still alive.
    let app = anykv_core::open(&format!(
        "etcds://app:{APP_PW}@{endpoint}/app?{q}&timeout=3s"
    ))
    .await
    .unwrap();
    app.put(&k, "mine".into(), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(app.list(&Prefix::root()).await.unwrap().len(), 1);
    let other = anykv_core::open(&format!(
        "etcds://app:{APP_PW}@{endpoint}/other?{q}&timeout=3s"
    ))
    .await
    .unwrap();
    let e = other
        .put(&k, "x".into(), PutOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    // A watch outside the user's range: refused at once, not a timeout
    // (etcd answers the create request with the watch's own id).
    let started = std::time::Instant::now();
    match other.watch(Target::Key(k.clone()), Start::Now).await {
        Err(e) => assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}"),
        Ok(_) => panic!("a watch outside the user's range was created"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(other.liveness().is_alive());
    assert!(!format!("{e:?}").contains(APP_PW));

    // Without the CA (system roots only) the server is not trusted.
    let untrusted = format!("etcds://root:{ROOT_PW}@{endpoint}/tls?timeout=2s&retries=0");
    match anykv_core::open(&untrusted).await {
        Err(e) => {
            eprintln!("tls: untrusted at open: {e}");
            assert!(e.indicates_unreachable(), "{e}");
        }
        Ok(kv4) => {
            let e = kv4.probe().await.expect_err("untrusted server");
            eprintln!("tls: untrusted at probe: {e}");
            assert!(e.indicates_unreachable(), "{e}");
        }
    }
}
