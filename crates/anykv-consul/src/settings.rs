//! The driver's URL options:
//! `consul[s]://host[:port]/[prefix]?token=…&dc=…&consistency=consistent|default&lock_delay=0s&ca_file=…`.

use std::{fmt, time::Duration};

use anykv_core::{Config, Result, Secret};

/// Query keys this driver reads (besides the common ones).
pub(crate) const PARAMS: &[&str] = &["token", "dc", "consistency", "lock_delay", "ca_file"];

/// Consul's default HTTP port.
const HTTP_PORT: u16 = 8500;
/// Consul's conventional HTTPS port.
const HTTPS_PORT: u16 = 8501;

/// Read consistency of plain reads (`get`, `list`, `keys`).
///
/// Reads that feed a decision (condition checks, lock state, watch
/// baselines) always use `consistent`, whatever this says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Consistency {
    /// Consul's default mode: served by the leader, which may (rarely, in a
    /// partition) be a deposed leader for a short time.
    Default,
    /// The leader checks with a quorum that it is still the leader first.
    Consistent,
}

/// Everything the driver needs from the URL.
#[derive(Clone)]
pub(crate) struct Settings {
    /// `http(s)://host:port/v1`.
    pub base: String,
    /// `host:port`, for messages.
    pub address: String,
    /// The ACL token, sent as `X-Consul-Token`; never shown.
    pub token: Option<Secret>,
    /// Datacenter (`?dc=`), appended to every request.
    pub dc: Option<String>,
    /// Mode of plain reads.
    pub consistency: Consistency,
    /// Lock-delay of lock sessions (`?lock_delay=`).
    pub lock_delay: Duration,
    /// Extra CA certificate for `consuls://`: the path, and its PEM read at open.
    pub ca_file: Option<(String, Vec<u8>)>,
    /// Per-request deadline (`?timeout=`, default 5 s): bounds connects,
    /// probes and the slack added to blocking queries.
    pub timeout: Duration,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("dc", &self.dc)
            .field("consistency", &self.consistency)
            .field("lock_delay", &self.lock_delay)
            .field("ca_file", &self.ca_file.as_ref().map(|(path, _)| path))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Settings {
    /// Reads the driver's options from a parsed URL.
    pub(crate) fn from_config(config: &Config) -> Result<Settings> {
        let tls = match config.scheme.as_str() {
            "consul" => false,
            "consuls" => true,
            other => return Err(config.invalid(format!("scheme {other:?} is not consul"))),
        };
        if config.username.is_some() || config.password.is_some() {
            return Err(config.invalid("consul takes an ACL token (?token=…), not user:password"));
        }
        let host = match config.hosts.as_slice() {
            [one] => one.clone(),
            [] => return Err(config.invalid("missing the consul agent address (host:port)")),
            _ => {
                return Err(config.invalid(
                    "consul talks to one agent; give a single host:port (the agent forwards to the servers)",
                ));
            }
        };
        let address = if host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            && !host.ends_with(']')
        {
            host
        } else {
            format!("{host}:{}", if tls { HTTPS_PORT } else { HTTP_PORT })
        };
        let base = format!("{}://{address}/v1", if tls { "https" } else { "http" });

        let token = config.secret_param("token");
        if let Some(t) = &token
            && (t.expose().is_empty() || !t.expose().bytes().all(|b| b.is_ascii_graphic()))
        {
            // A value that cannot be an HTTP header; never echo it.
            return Err(config.invalid("token must be non-empty printable ASCII"));
        }
        let dc = config.param("dc").map(str::to_owned);
        if let Some(dc) = &dc
            && (dc.is_empty()
                || !dc
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            return Err(config.invalid(format!("dc={dc:?}: expected a datacenter name")));
        }
        let consistency = match config.param("consistency") {
            None | Some("default") => Consistency::Default,
            Some("consistent") => Consistency::Consistent,
            Some(other) => {
                return Err(config.invalid(format!(
                    "consistency={other:?}: expected consistent or default"
                )));
            }
        };
        let lock_delay = config
            .duration_param("lock_delay")?
            .unwrap_or(Duration::ZERO);
        if lock_delay > Duration::from_secs(60) {
            return Err(config.invalid("lock_delay is at most 60s (Consul's limit)"));
        }
        let ca_file = match config.param("ca_file") {
            None => None,
            Some(_) if !tls => return Err(config.invalid("ca_file needs the consuls:// scheme")),
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| config.invalid(format!("ca_file {path}: {e}")))?;
                Some((path.to_owned(), pem))
            }
        };
        let timeout = config
            .duration_param("timeout")?
            .filter(|t| !t.is_zero())
            .unwrap_or(Duration::from_secs(5));
        Ok(Settings {
            base,
            address,
            token,
            dc,
            consistency,
            lock_delay,
            ca_file,
            timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<Settings> {
        Settings::from_config(&Config::parse(url)?)
    }

    #[test]
    fn defaults_and_options() {
        let s = parse(
            "consul://127.0.0.1:8600/app?token=s3cr3t&dc=dc1&consistency=consistent&lock_delay=15s",
        )
        .unwrap();
        assert_eq!(s.base, "http://127.0.0.1:8600/v1");
        assert_eq!(s.dc.as_deref(), Some("dc1"));
        assert_eq!(s.consistency, Consistency::Consistent);
        assert_eq!(s.lock_delay, Duration::from_secs(15));
        assert_eq!(s.token.as_ref().map(Secret::expose), Some("s3cr3t"));
        assert!(!format!("{s:?}").contains("s3cr3t"));

        let s = parse("consuls://consul.example").unwrap();
        assert_eq!(s.base, "https://consul.example:8501/v1");
        assert_eq!(s.consistency, Consistency::Default);
        assert_eq!(s.lock_delay, Duration::ZERO);
        assert_eq!(parse("consul://h").unwrap().base, "http://h:8500/v1");
    }

    #[test]
    fn bad_options_are_invalid_url_without_the_token() {
        for url in [
            "consul://h:1?consistency=stale",
            "consul://h1:1,h2:2",
            "consul://",
            "consul://u:pw@h:1",
            "consul://h:1?token=a%20b",
            "consul://h:1?lock_delay=2m",
            "consul://h:1?ca_file=/x.pem",
            "consul://h:1?dc=a/b",
        ] {
            let e = parse(url).err().unwrap_or_else(|| panic!("{url} accepted"));
            assert_eq!(e.kind(), anykv_core::ErrorKind::InvalidUrl, "{url}: {e}");
            assert!(!e.to_string().contains("a b"), "{e}");
        }
    }
}
