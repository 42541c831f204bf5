//! Connection settings: from a URL (`etcd://`, `etcds://`) or built in code.

use std::{fmt, path::PathBuf, time::Duration};

use anykv_core::{Config, Error, Result, Secret};
use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use crate::{error::BACKEND, watch::DEFAULT_WATCHES_PER_STREAM};

/// Port used when an endpoint names none.
pub const DEFAULT_PORT: u16 = 2379;

/// Default per-operation timeout, as for every anykv URL.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Query keys this driver reads (besides the common ones such as `timeout`).
pub const PARAMS: &[&str] = &["ca", "cert", "key", "domain", WATCHES_PER_STREAM];

/// Query key: most watches sharing one gRPC watch stream.
const WATCHES_PER_STREAM: &str = "watches_per_stream";

/// The options that need TLS.
const TLS_PARAMS: &[&str] = &["ca", "cert", "key", "domain"];

/// TLS material, as PEM.
#[derive(Clone, Default)]
pub struct Tls {
    /// CA certificate(s) that sign the servers' certificates. `None`: the
    /// system's trusted roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and private key, for mutual TLS.
    pub identity_pem: Option<(Vec<u8>, Secret)>,
    /// Server name to verify instead of the endpoint's host (when connecting
    /// by IP address to a certificate issued for a name).
    pub domain: Option<String>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_identity", &self.identity_pem.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

/// Everything needed to reach an etcd cluster.
///
/// ```
/// use anykv_etcd::EtcdOptions;
/// let o = EtcdOptions::new(["127.0.0.1:2379", "127.0.0.1:22379"])
///     .with_user("app", "s3cret")
///     .with_timeout(std::time::Duration::from_secs(2));
/// assert!(!format!("{o:?}").contains("s3cret"));
/// ```
#[derive(Clone)]
pub struct EtcdOptions {
    /// `host:port` of each member to talk to.
    pub endpoints: Vec<String>,
    /// TLS settings; `None` for plain HTTP/2.
    pub tls: Option<Tls>,
    /// User name and password, for clusters with authentication enabled.
    pub user: Option<(String, Secret)>,
    /// Bound of the driver's own round trips (connect, lease renewal, watch
    /// re-establishment, probe). The layers bound each operation separately.
    pub timeout: Duration,
    /// Most watches multiplexed on one gRPC watch stream (URL option
    /// `watches_per_stream`, default
    /// [`DEFAULT_WATCHES_PER_STREAM`]);
    /// more watches open more streams.
    pub watches_per_stream: usize,
}

impl fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("timeout", &self.timeout)
            .field("watches_per_stream", &self.watches_per_stream)
            .finish()
    }
}

impl EtcdOptions {
    /// Plain-text endpoints (`host:port`), no authentication, default timeout.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        EtcdOptions {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            tls: None,
            user: None,
            timeout: DEFAULT_TIMEOUT,
            watches_per_stream: DEFAULT_WATCHES_PER_STREAM,
        }
    }

    /// Authenticates as `user`.
    pub fn with_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((user.into(), Secret::new(password)));
        self
    }

    /// Uses TLS.
    pub fn with_tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets how many watches share one gRPC watch stream at most.
    pub fn with_watches_per_stream(mut self, n: usize) -> Self {
        self.watches_per_stream = n.max(1);
        self
    }

    /// Sets the driver's timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Reads `etcd://[user:password@]h:p[,h:p…]/prefix?timeout=…` or
    /// `etcds://…?ca=ca.pem&cert=client.pem&key=client-key.pem&domain=name`.
    ///
    /// The TLS files are read here, so a missing file fails at open time.
    pub fn from_config(config: &Config) -> Result<Self> {
        let tls = match config.scheme.as_str() {
            "etcd" => {
                for k in TLS_PARAMS {
                    if config.param(k).is_some() {
                        return Err(config
                            .invalid(format!("option {k:?} needs TLS: use the etcds:// scheme")));
                    }
                }
                None
            }
            "etcds" => Some(tls_from_config(config)?),
            other => return Err(config.invalid(format!("scheme {other:?} is not etcd"))),
        };
        if config.hosts.is_empty() {
            return Err(config.invalid("no endpoint: expected etcd://host:port[,host:port…]"));
        }
        let endpoints = config
            .hosts
            .iter()
            .map(|h| {
                if has_port(h) {
                    h.clone()
                } else {
                    format!("{h}:{DEFAULT_PORT}")
                }
            })
            .collect();
        let user = match (&config.username, &config.password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            (Some(_), None) => {
                return Err(config.invalid("user name without password: use user:password@"));
            }
            _ => None,
        };
        let timeout = match config.duration_param("timeout")? {
            Some(t) if !t.is_zero() => t,
            Some(_) => return Err(config.invalid("timeout must be positive")),
            None => DEFAULT_TIMEOUT,
        };
        let watches_per_stream = match config.parse_param::<usize>(WATCHES_PER_STREAM)? {
            Some(0) => return Err(config.invalid("watches_per_stream must be positive")),
            Some(n) => n,
            None => DEFAULT_WATCHES_PER_STREAM,
        };
        Ok(EtcdOptions {
            endpoints,
            tls,
            user,
            timeout,
            watches_per_stream,
        })
    }

    /// The endpoint URLs handed to etcd-client.
    pub(crate) fn urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect()
    }

    /// etcd-client options.
    pub(crate) fn connect_options(&self) -> ConnectOptions {
        // HTTP/2 pings find a hung member (SIGSTOP, black hole) so that watch
        // and keep-alive streams move to another one. etcd's default
        // enforcement policy refuses pings more often than every 5 s and any
        // ping without an open stream (GOAWAY "too_many_pings"), hence 10 s
        // and never while idle.
        let mut o = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            .with_keep_alive(Duration::from_secs(10), self.timeout)
            .with_keep_alive_while_idle(false)
            // A member cut off from the quorum must not serve watches or
            // linearizable reads: fail them so the client moves on.
            .with_require_leader(true);
        if let Some((user, password)) = &self.user {
            o = o
                .with_user(user.clone(), password.expose().to_owned())
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = &self.tls {
            let mut t = TlsOptions::new();
            t = match &tls.ca_pem {
                Some(ca) => t.ca_certificate(Certificate::from_pem(ca)),
                None => t.with_native_roots(),
            };
            if let Some((cert, key)) = &tls.identity_pem {
                t = t.identity(Identity::from_pem(cert, key.expose()));
            }
            if let Some(d) = &tls.domain {
                t = t.domain_name(d.clone());
            }
            o = o.with_tls(t);
        }
        o
    }
}

fn has_port(host: &str) -> bool {
    match host.rsplit_once(':') {
        // `[::1]` has colons but no port; `[::1]:2379` has one.
        Some((h, p)) => !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':'),
        None => false,
    }
}

fn tls_from_config(config: &Config) -> Result<Tls> {
    let read = |key: &str| -> Result<Option<Vec<u8>>> {
        let Some(path) = config.param(key) else {
            return Ok(None);
        };
        let path = PathBuf::from(path);
        std::fs::read(&path)
            .map(Some)
            .map_err(|e| Error::InvalidArgument {
                backend: BACKEND,
                message: format!("cannot read {key} file {}: {e}", path.display()),
            })
    };
    let identity_pem = match (read("cert")?, read("key")?) {
        (Some(cert), Some(key)) => {
            let key = String::from_utf8(key).map_err(|_| Error::InvalidArgument {
                backend: BACKEND,
                message: "the key file is not PEM text".into(),
            })?;
            Some((cert, Secret::new(key)))
        }
        (None, None) => None,
        _ => return Err(config.invalid("cert and key go together")),
    };
    Ok(Tls {
        ca_pem: read("ca")?,
        identity_pem,
        domain: config.param("domain").map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_user_and_timeout() {
        let c = Config::parse("etcd://bob:pw%21@h1:1,h2/app?timeout=2s").unwrap();
        let o = EtcdOptions::from_config(&c).unwrap();
        assert_eq!(o.endpoints, ["h1:1", "h2:2379"]);
        assert_eq!(o.urls(), ["http://h1:1", "http://h2:2379"]);
        assert_eq!(o.timeout, Duration::from_secs(2));
        let (u, p) = o.user.as_ref().unwrap();
        assert_eq!((u.as_str(), p.expose()), ("bob", "pw!"));
        let shown = format!("{o:?}");
        assert!(shown.contains("bob") && !shown.contains("pw!"), "{shown}");
    }

    #[test]
    fn tls_options_need_etcds_and_files() {
        let c = Config::parse("etcd://h:1?ca=/x.pem").unwrap();
        assert!(matches!(
            EtcdOptions::from_config(&c),
            Err(Error::InvalidUrl { .. })
        ));
        let c = Config::parse("etcds://h:1?ca=/nonexistent/ca.pem").unwrap();
        let e = EtcdOptions::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let c = Config::parse("etcds://h:1?cert=/a.pem").unwrap();
        assert!(EtcdOptions::from_config(&c).is_err());
        let c = Config::parse("etcds://h:1").unwrap();
        let o = EtcdOptions::from_config(&c).unwrap();
        assert_eq!(o.urls(), ["https://h:1"]);
    }

    #[test]
    fn watches_per_stream_is_a_positive_url_option() {
        let c = Config::parse("etcd://h:1").unwrap();
        let o = EtcdOptions::from_config(&c).unwrap();
        assert_eq!(o.watches_per_stream, DEFAULT_WATCHES_PER_STREAM);
        let c = Config::parse("etcd://h:1?watches_per_stream=50").unwrap();
        assert_eq!(EtcdOptions::from_config(&c).unwrap().watches_per_stream, 50);
        for bad in ["0", "x"] {
            let c = Config::parse(&format!("etcd://h:1?watches_per_stream={bad}")).unwrap();
            assert!(EtcdOptions::from_config(&c).is_err(), "{bad}");
        }
    }

    #[test]
    fn user_without_password_is_rejected() {
        let c = Config::parse("etcd://bob@h:1").unwrap();
        assert!(EtcdOptions::from_config(&c).is_err());
    }

    #[test]
    fn ports() {
        assert!(has_port("h:1"));
        assert!(!has_port("h"));
        assert!(has_port("[::1]:2379"));
    }
}
