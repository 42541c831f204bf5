//! Shared bits of the anykv examples (the examples themselves are the
//! `*.rs` files at this package's root; each is run from the repo root with
//! `cargo run --example NAME [URL] [options]`).

use std::{str::FromStr, time::Duration};

use anyhow::{Context, anyhow};

/// The command line of an example: positional arguments (URLs, a prefix)
/// and `--name value` / `--flag` options.
#[derive(Debug, Default)]
pub struct Args {
    positional: Vec<String>,
    options: Vec<(String, Option<String>)>,
}

impl Args {
    /// Parses the process's arguments. `takes_value` names the options that
    /// are followed by a value (`--ttl 10`); other `--x` are flags.
    pub fn parse(takes_value: &[&str]) -> anyhow::Result<Args> {
        Args::from_iter(std::env::args().skip(1), takes_value)
    }

    /// Parses `args` (without the program name), as [`Args::parse`].
    pub fn from_iter(
        args: impl IntoIterator<Item = String>,
        takes_value: &[&str],
    ) -> anyhow::Result<Args> {
        let mut out = Args::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.strip_prefix("--") {
                Some(name) if takes_value.contains(&name) => {
                    let value = args
                        .next()
                        .ok_or_else(|| anyhow!("--{name} needs a value"))?;
                    out.options.push((name.to_owned(), Some(value)));
                }
                Some(name) => out.options.push((name.to_owned(), None)),
                None => out.positional.push(arg),
            }
        }
        Ok(out)
    }

    /// The `i`-th positional argument, or `default`.
    pub fn positional(&self, i: usize, default: &str) -> String {
        self.positional
            .get(i)
            .cloned()
            .unwrap_or_else(|| default.to_owned())
    }

    /// Whether the `i`-th positional argument was given.
    pub fn has_positional(&self, i: usize) -> bool {
        self.positional.len() > i
    }

    /// Whether the flag `--name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.options.iter().any(|(n, _)| n == name)
    }

    /// The value of `--name`, parsed, or `default`.
    pub fn value<T: FromStr>(&self, name: &str, default: T) -> anyhow::Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        match self.options.iter().rev().find(|(n, _)| n == name) {
            Some((_, Some(v))) => v.parse().with_context(|| format!("--{name} {v:?}")),
            _ => Ok(default),
        }
    }

    /// The value of `--name` in seconds (fractions allowed), or `default`.
    pub fn seconds(&self, name: &str, default: Duration) -> anyhow::Result<Duration> {
        let secs: f64 = self.value(name, default.as_secs_f64())?;
        Duration::try_from_secs_f64(secs).with_context(|| format!("--{name} {secs}"))
    }
}
