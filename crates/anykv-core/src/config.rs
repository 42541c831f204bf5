//! Store URLs: `scheme://[user[:password]@]host:port[,host:port…]/[prefix]?key=value&…`.
//!
//! Parsed by hand rather than with `url`, because multi-host authorities
//! (`h1:2379,h2:2379`) are not valid URLs for it.

use std::{collections::BTreeMap, fmt, str::FromStr, time::Duration};

use percent_encoding::percent_decode_str;

use crate::{
    error::{Error, Result},
    key::Prefix,
};

/// Query keys whose values are redacted like passwords.
pub const SECRET_PARAMS: &[&str] = &["token", "password", "secret", "key_password"];

/// A string that never shows in `Debug` or `Display`.
///
/// ```
/// let s = anykv_core::Secret::new("hunter2");
/// assert_eq!(format!("{s} {s:?}"), "*** ***");
/// assert_eq!(s.expose(), "hunter2");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A parsed store URL, handed to a driver's constructor.
#[derive(Clone, Debug)]
pub struct Config {
    /// The URL with secrets replaced by `***`.
    pub redacted: String,
    /// Lower-case scheme.
    pub scheme: String,
    /// User name, if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<Secret>,
    /// `host[:port]` entries of the authority, in order.
    pub hosts: Vec<String>,
    /// The path after the authority, without the leading `/`, percent-decoded.
    pub path: String,
    /// The store's namespace (from `?prefix=`, or the path for drivers whose
    /// path is a namespace). Applied by the layers, not by drivers.
    pub namespace: Prefix,
    params: BTreeMap<String, String>,
}

impl Config {
    /// Parses a URL; validates its shape but not its query keys (see
    /// [`Config::check_params`]).
    pub fn parse(url: &str) -> Result<Config> {
        let redacted = redact(url);
        let bad = |reason: String| Error::InvalidUrl {
            url: redacted.clone(),
            reason,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected scheme://…".into()))?;
        let scheme = scheme.to_ascii_lowercase();
        let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !scheme_ok {
            return Err(bad(format!("invalid scheme {scheme:?}")));
        }
        if rest.contains('#') {
            return Err(bad("fragments ('#') are not allowed".into()));
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.split_once('/') {
            Some((a, p)) => (a, p),
            None => (before_query, ""),
        };
        let decode = |s: &str, what: &str| -> Result<String> {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| bad(format!("{what} is not valid UTF-8 after percent-decoding")))
        };
        let (userinfo, hostlist) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((name, pw)) => (
                    Some(decode(name, "user name")?),
                    Some(Secret(decode(pw, "password")?)),
                ),
                None => (Some(decode(u, "user name")?), None),
            },
        };
        let mut hosts = Vec::new();
        for h in hostlist.split(',').filter(|h| !h.is_empty()) {
            if let Some((host, port)) = h.rsplit_once(':') {
                if host.is_empty() {
                    return Err(bad(format!("missing host before port in {h:?}")));
                }
                if port.parse::<u16>().is_err() {
                    return Err(bad(format!("invalid port {port:?} in {h:?}")));
                }
            }
            hosts.push(decode(h, "host")?);
        }
        let path = decode(path.trim_end_matches('/'), "path")?;
        let mut params = BTreeMap::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = decode(k, "query key")?;
            let v = decode(&v.replace('+', " "), "query value")?;
            if params.insert(k.clone(), v).is_some() {
                return Err(bad(format!("query key {k:?} given twice")));
            }
        }
        Ok(Config {
            redacted,
            scheme,
            username,
            password,
            hosts,
            path,
            namespace: Prefix::root(),
            params,
        })
    }

    /// Rejects query keys outside `accepted`, naming the key and the accepted ones.
    pub fn check_params(&self, accepted: &[&str]) -> Result<()> {
        for k in self.params.keys() {
            if !accepted.contains(&k.as_str()) {
                let mut list: Vec<&str> = accepted.to_vec();
                list.sort_unstable();
                return Err(self.invalid(format!(
                    "unknown option {k:?}; accepted: {}",
                    list.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// A query value.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }

    /// A query value kept secret.
    pub fn secret_param(&self, key: &str) -> Option<Secret> {
        self.param(key).map(Secret::new)
    }

    /// A query value parsed as `T`.
    pub fn parse_param<T: FromStr>(&self, key: &str) -> Result<Option<T>>
    where
        T::Err: fmt::Display,
    {
        self.param(key)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|e| self.invalid(format!("option {key}={v:?}: {e}")))
            })
            .transpose()
    }

    /// A query value parsed as a duration (`5s`, `250ms`, `1m`).
    pub fn duration_param(&self, key: &str) -> Result<Option<Duration>> {
        self.param(key)
            .map(|v| {
                humantime::parse_duration(v)
                    .map_err(|e| self.invalid(format!("option {key}={v:?}: {e}")))
            })
            .transpose()
    }

    /// A query value parsed as a boolean (`true`/`false`/`1`/`0`).
    pub fn bool_param(&self, key: &str) -> Result<Option<bool>> {
        self.param(key)
            .map(|v| match v {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(self.invalid(format!("option {key}={v:?}: expected true or false"))),
            })
            .transpose()
    }

    /// Authority and path joined back (`dir/file.redb`), for drivers whose URL
    /// names a location (a file, an in-process store) rather than servers.
    pub fn location(&self) -> String {
        let hosts = self.hosts.join(",");
        match (hosts.is_empty(), self.path.is_empty()) {
            (true, _) => format!("/{}", self.path),
            (false, true) => hosts,
            (false, false) => format!("{hosts}/{}", self.path),
        }
    }

    /// An `InvalidUrl` error for this URL.
    pub fn invalid(&self, reason: impl Into<String>) -> Error {
        Error::InvalidUrl {
            url: self.redacted.clone(),
            reason: reason.into(),
        }
    }
}

/// The URL with its password and secret query values replaced by `***`.
pub fn redact(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let mut out = match head.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = match rest.split_once('/') {
                Some((a, p)) => (a, Some(p)),
                None => (rest, None),
            };
            let authority = match authority.rsplit_once('@') {
                Some((userinfo, hosts)) => match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:***@{hosts}"),
                    None => authority.to_owned(),
                },
                None => authority.to_owned(),
            };
            match path {
                Some(p) => format!("{scheme}://{authority}/{p}"),
                None => format!("{scheme}://{authority}"),
            }
        }
        None => head.to_owned(),
    };
    if let Some(q) = query {
        let parts: Vec<String> = q
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if SECRET_PARAMS.contains(&k) => format!("{k}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&parts.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_multi_host_with_credentials() {
        let c = Config::parse("etcd://alice:s%40cret@h1:2379,h2:2380/app/prod?timeout=2s").unwrap();
        assert_eq!(c.scheme, "etcd");
        assert_eq!(c.username.as_deref(), Some("alice"));
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("s@cret"));
        assert_eq!(c.hosts, ["h1:2379", "h2:2380"]);
        assert_eq!(c.path, "app/prod");
        assert_eq!(
            c.duration_param("timeout").unwrap(),
            Some(Duration::from_secs(2))
        );
        assert!(!format!("{c:?}").contains("cret"));
        assert_eq!(
            c.redacted,
            "etcd://alice:***@h1:2379,h2:2380/app/prod?timeout=2s"
        );
    }

    #[test]
    fn locations() {
        assert_eq!(
            Config::parse("redb://rel.redb").unwrap().location(),
            "rel.redb"
        );
        assert_eq!(
            Config::parse("redb:///abs/x.redb").unwrap().location(),
            "/abs/x.redb"
        );
        assert_eq!(
            Config::parse("redb://dir/x.redb").unwrap().location(),
            "dir/x.redb"
        );
        assert_eq!(Config::parse("memory://").unwrap().location(), "/");
    }

    #[test]
    fn rejects_malformed() {
        for u in [
            "nope",
            "etcd://h:99999",
            "etcd://:1",
            "1x://h",
            "etcd://h?a=1&a=2",
            "etcd://h#f",
        ] {
            let e = Config::parse(u).expect_err(u);
            assert!(matches!(e, Error::InvalidUrl { .. }), "{u}: {e}");
        }
    }

    #[test]
    fn unknown_param_names_key_and_accepted() {
        let c = Config::parse("consul://h:1?token=abc&tiemout=1s").unwrap();
        let e = c
            .check_params(&["token", "timeout"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"tiemout\"") && e.contains("timeout, token"),
            "{e}"
        );
        assert!(!e.contains("abc"), "{e}");
    }

    #[test]
    fn bad_values_are_typed_errors() {
        let c = Config::parse("x://h?timeout=soon").unwrap();
        assert!(matches!(
            c.duration_param("timeout"),
            Err(Error::InvalidUrl { .. })
        ));
    }
}
