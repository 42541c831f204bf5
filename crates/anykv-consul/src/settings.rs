//! The driver's URL options:
//! `consul[s]://host[:port]/[prefix]?token=…&dc=…&consistency=consistent|default|stale&lock_delay=0s&ca_file=…&max_conns=32&max_watch_conns=16`.

use std::{fmt, time::Duration};

use anykv_core::{Config, Result, Secret};

/// Query keys this driver reads (besides the common ones).
pub(crate) const PARAMS: &[&str] = &[
    "token",
    "dc",
    "consistency",
    "lock_delay",
    "ca_file",
    "max_conns",
    "max_watch_conns",
];

/// Default of `max_conns`: concurrent HTTP requests of one handle, well
/// under Consul's default `limits.http_max_conns_per_client` (200).
pub(crate) const DEFAULT_MAX_CONNS: usize = 32;
/// Default of `max_watch_conns`: the share of `max_conns` that watches'
/// blocking queries may hold.
pub(crate) const DEFAULT_MAX_WATCH_CONNS: usize = 16;

/// Consul's default HTTP port.
const HTTP_PORT: u16 = 8500;
/// Consul's conventional HTTPS port.
const HTTPS_PORT: u16 = 8501;

/// Read consistency of the reads a user asks for (`get`, `exists`, `list`,
/// `keys`, `export`, `lock_holder`) and of a watch's blocking queries.
///
/// Reads that feed a decision (condition checks, lock state, watch
/// baselines and the re-read that confirms a watch reset) always use
/// `consistent`, whatever this says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Consistency {
    /// `?consistent` (anykv's default): the leader checks with a quorum
    /// that it is still the leader, and that it has applied its whole log,
    /// before answering. Never misses an acknowledged write.
    Consistent,
    /// Consul's default mode: served by the leader without those checks. A
    /// server just restarted (or newly elected) answers from a state that
    /// is still replaying its log for a moment (seen here: acknowledged
    /// keys absent for 10–260 ms), and a deposed leader can answer stale
    /// data in a partition.
    Default,
    /// `?stale`: any server answers from its own state, however far behind
    /// (its lag shows in `X-Consul-LastContact`); works without a leader.
    Stale,
}

impl Consistency {
    /// The option values, for messages.
    pub(crate) const ACCEPTED: &'static str = "consistent, default or stale";

    fn parse(value: &str) -> Option<Consistency> {
        match value {
            "consistent" => Some(Consistency::Consistent),
            "default" => Some(Consistency::Default),
            "stale" => Some(Consistency::Stale),
            _ => None,
        }
    }
}

/// Everything the driver needs from the URL.
#[derive(Clone)]
pub(crate) struct Settings {
    /// `http(s)://host:port/v1` of each agent, in URL order.
    pub bases: Vec<String>,
    /// `host:port` of each agent, for messages.
    pub agents: Vec<String>,
    /// The ACL token, sent as `X-Consul-Token`; never shown.
    pub token: Option<Secret>,
    /// Datacenter (`?dc=`), appended to every request.
    pub dc: Option<String>,
    /// Mode of the reads a user asks for (`?consistency=`, default `consistent`).
    pub consistency: Consistency,
    /// Lock-delay of lock sessions (`?lock_delay=`).
    pub lock_delay: Duration,
    /// Extra CA certificate for `consuls://`: the path, and its PEM read at open.
    pub ca_file: Option<(String, Vec<u8>)>,
    /// Per-request deadline (`?timeout=`, default 5 s): bounds connects,
    /// probes and the slack added to blocking queries.
    pub timeout: Duration,
    /// Concurrent HTTP requests of the handle (`?max_conns=`, default 32),
    /// watches included; locks' blocking queries come on top (one each).
    pub max_conns: usize,
    /// Concurrent blocking queries of watches (`?max_watch_conns=`,
    /// default 16, below `max_conns`): the rest is reserved for operations.
    pub max_watch_conns: usize,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("bases", &self.bases)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("dc", &self.dc)
            .field("consistency", &self.consistency)
            .field("lock_delay", &self.lock_delay)
            .field("ca_file", &self.ca_file.as_ref().map(|(path, _)| path))
            .field("timeout", &self.timeout)
            .field("max_conns", &self.max_conns)
            .field("max_watch_conns", &self.max_watch_conns)
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
        if config.hosts.is_empty() {
            return Err(config.invalid("missing the consul agent address (host:port)"));
        }
        let default_port = if tls { HTTPS_PORT } else { HTTP_PORT };
        let agents: Vec<String> = config
            .hosts
            .iter()
            .map(|host| {
                let has_port = host
                    .rsplit_once(':')
                    .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
                    && !host.ends_with(']');
                if has_port {
                    host.clone()
                } else {
                    format!("{host}:{default_port}")
                }
            })
            .collect();
        let scheme = if tls { "https" } else { "http" };
        let bases = agents
            .iter()
            .map(|a| format!("{scheme}://{a}/v1"))
            .collect();

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
            None => Consistency::Consistent,
            Some(v) => Consistency::parse(v).ok_or_else(|| {
                config.invalid(format!(
                    "consistency={v:?}: expected {}",
                    Consistency::ACCEPTED
                ))
            })?,
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
        let count = |name: &str, default: usize| -> Result<usize> {
            match config.param(name) {
                None => Ok(default),
                Some(v) => v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=4096).contains(n))
                    .ok_or_else(|| config.invalid(format!("{name}={v:?}: expected 1 to 4096"))),
            }
        };
        let max_conns = count("max_conns", DEFAULT_MAX_CONNS)?;
        let max_watch_conns = count(
            "max_watch_conns",
            DEFAULT_MAX_WATCH_CONNS.min(max_conns.saturating_sub(1).max(1)),
        )?;
        if max_conns < 2 || max_watch_conns >= max_conns {
            return Err(config.invalid(format!(
                "max_watch_conns={max_watch_conns} must be below max_conns={max_conns} \
                 (the rest serves gets, puts and locks)"
            )));
        }
        Ok(Settings {
            bases,
            agents,
            token,
            dc,
            consistency,
            lock_delay,
            ca_file,
            timeout,
            max_conns,
            max_watch_conns,
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
            "consul://127.0.0.1:8600/app?token=s3cr3t&dc=dc1&consistency=stale&lock_delay=15s",
        )
        .unwrap();
        assert_eq!(s.bases, ["http://127.0.0.1:8600/v1"]);
        assert_eq!(s.dc.as_deref(), Some("dc1"));
        assert_eq!(s.consistency, Consistency::Stale);
        assert_eq!(s.lock_delay, Duration::from_secs(15));
        assert_eq!(s.token.as_ref().map(Secret::expose), Some("s3cr3t"));
        assert!(!format!("{s:?}").contains("s3cr3t"));

        let s = parse("consuls://consul.example").unwrap();
        assert_eq!(s.bases, ["https://consul.example:8501/v1"]);
        assert_eq!(
            s.consistency,
            Consistency::Consistent,
            "reads never miss an acknowledged write unless asked to"
        );
        assert_eq!(s.lock_delay, Duration::ZERO);
        assert_eq!((s.max_conns, s.max_watch_conns), (32, 16));
        let s = parse("consul://h?max_conns=8&max_watch_conns=3").unwrap();
        assert_eq!((s.max_conns, s.max_watch_conns), (8, 3));
        let s = parse("consul://h?max_conns=4").unwrap();
        assert_eq!(
            (s.max_conns, s.max_watch_conns),
            (4, 3),
            "fits the smaller total"
        );
        for (v, c) in [
            ("consistent", Consistency::Consistent),
            ("default", Consistency::Default),
            ("stale", Consistency::Stale),
        ] {
            let s = parse(&format!("consul://h:1?consistency={v}")).unwrap();
            assert_eq!(s.consistency, c, "{v}");
        }
        assert_eq!(parse("consul://h").unwrap().bases, ["http://h:8500/v1"]);
        let s = parse("consul://a:1,b,c:3").unwrap();
        assert_eq!(
            s.bases,
            ["http://a:1/v1", "http://b:8500/v1", "http://c:3/v1"],
            "several agents, tried in turn"
        );
        assert_eq!(s.agents, ["a:1", "b:8500", "c:3"]);
    }

    #[test]
    fn bad_options_are_invalid_url_without_the_token() {
        for url in [
            "consul://h:1?consistency=linearizable",
            "consul://",
            "consul://u:pw@h:1",
            "consul://h:1?token=a%20b",
            "consul://h:1?lock_delay=2m",
            "consul://h:1?ca_file=/x.pem",
            "consul://h:1?dc=a/b",
            "consul://h:1?max_conns=0",
            "consul://h:1?max_conns=1",
            "consul://h:1?max_conns=8&max_watch_conns=8",
            "consul://h:1?max_watch_conns=x",
        ] {
            let e = parse(url).err().unwrap_or_else(|| panic!("{url} accepted"));
            assert_eq!(e.kind(), anykv_core::ErrorKind::InvalidUrl, "{url}: {e}");
            assert!(!e.to_string().contains("a b"), "{e}");
        }
        let e = parse("consul://h:1?consistency=strong").err().unwrap();
        assert!(
            e.to_string().contains(Consistency::ACCEPTED),
            "names the accepted values: {e}"
        );
    }
}
