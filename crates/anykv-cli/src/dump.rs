//! `anykv dump [--prefix P] [--file FILE]`: every pair below a prefix, read
//! at one revision, as JSON lines (format in [`crate::dumpfile`]).
//!
//! The pairs come from one `Store::snapshot`, whose revision goes in the
//! header. A backend without snapshot (`capabilities().snapshot` is None,
//! or the driver answers `Unsupported`) is streamed with `export` instead:
//! the header then says `"consistent":false` and `"revision":null`.
//! A snapshot is held in memory by the store API; the export fallback
//! streams pair by pair.

use std::{
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
    time::SystemTime,
};

use anykv::{ErrorKind, Kv, KvPair, Prefix, Store};
use futures::StreamExt;
use tempfile::NamedTempFile;

use crate::{
    dumpfile::{EndLine, FORMAT, Header, PairLine, VERSION},
    exit::{self, Failure},
    output::{self, JsonValue},
};

/// Header note of a dump read without a snapshot.
const NOT_CONSISTENT: &str = "this backend has no snapshot: pairs were streamed by export, \
                              not read at one revision; writes during the dump may show partly";

/// Dumps to `file` (stdout when None) and prints nothing else.
///
/// A file is written under a temporary name in its directory, synced and
/// renamed over FILE only when complete: a failed dump leaves an earlier
/// FILE as it was. Like any temp file it is readable by its owner only (a
/// dump often holds secrets).
pub async fn run(kv: &Kv, prefix: &Prefix, file: Option<PathBuf>) -> Result<u8, Failure> {
    let Some(path) = file else {
        let (_, mut out) = write(kv, prefix, || Ok(io::stdout())).await?;
        out.flush().map_err(write_failed)?;
        return Ok(exit::OK);
    };
    let (_, tmp) = write(kv, prefix, || temp_beside(&path)).await?;
    tmp.as_file().sync_all().map_err(write_failed)?;
    tmp.persist(&path).map_err(|e| {
        Failure::new(
            exit::FAILURE,
            format!("cannot write {}: {}", path.display(), e.error),
        )
    })?;
    Ok(exit::OK)
}

/// An unnamed-until-persisted file in FILE's directory (so that the final
/// rename stays on one file system).
fn temp_beside(path: &Path) -> Result<NamedTempFile, Failure> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    tempfile::Builder::new()
        .prefix(".anykv-dump-")
        .tempfile_in(dir)
        .map_err(|e| Failure::usage(format!("cannot create {}: {e}", path.display())))
}

/// Reads the pairs below `prefix` and writes the dump to the writer that
/// `open` returns once the read has started (so a store that fails to
/// answer leaves no file behind). Returns the number of pairs and the
/// flushed writer.
pub async fn write<W: Write>(
    kv: &Kv,
    prefix: &Prefix,
    open: impl FnOnce() -> Result<W, Failure>,
) -> Result<(u64, W), Failure> {
    let snapshot = if kv.capabilities().snapshot.is_some() {
        match kv.snapshot(std::slice::from_ref(prefix)).await {
            Ok(s) => Some(s),
            // A driver may declare snapshot and still refuse (an older
            // server): the export below is the same as for an undeclared one.
            Err(e) if e.kind() == ErrorKind::Unsupported => None,
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    let header = Header {
        format: FORMAT,
        version: VERSION,
        backend: kv.backend().to_owned(),
        revision: snapshot.as_ref().map(|s| s.revision),
        consistent: snapshot.is_some(),
        snapshot: snapshot
            .as_ref()
            .and(kv.capabilities().snapshot)
            .map(output::snapshot_mode),
        prefix: prefix.as_str().to_owned(),
        created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        note: snapshot.is_none().then_some(NOT_CONSISTENT),
    };
    let mut count = 0;
    let out = match snapshot {
        Some(snapshot) => {
            let mut w = Writer::new(open()?);
            w.line(&header)?;
            for pair in &snapshot.pairs {
                w.pair(prefix, pair)?;
                count += 1;
            }
            w.end(count)?
        }
        None => {
            let mut pairs = kv.export(prefix).await?;
            let mut w = Writer::new(open()?);
            w.line(&header)?;
            while let Some(pair) = pairs.next().await {
                w.pair(prefix, &pair?)?;
                count += 1;
            }
            w.end(count)?
        }
    };
    Ok((count, out))
}

/// Buffered JSON lines; write errors become a failure that names the dump
/// (a closed pipe is an error here, unlike `list`: a cut dump is no dump).
struct Writer<W: Write> {
    out: BufWriter<W>,
}

impl<W: Write> Writer<W> {
    fn new(out: W) -> Self {
        Writer {
            out: BufWriter::with_capacity(1 << 20, out),
        }
    }

    fn line<T: serde::Serialize>(&mut self, value: &T) -> Result<(), Failure> {
        serde_json::to_writer(&mut self.out, value)
            .map_err(io::Error::from)
            .and_then(|()| self.out.write_all(b"\n"))
            .map_err(write_failed)
    }

    fn pair(&mut self, prefix: &Prefix, pair: &KvPair) -> Result<(), Failure> {
        let key = prefix.strip(&pair.key).ok_or_else(|| {
            Failure::new(
                exit::FAILURE,
                format!(
                    "the backend returned {} for prefix {:?}",
                    pair.key,
                    prefix.as_str()
                ),
            )
        })?;
        self.line(&PairLine {
            key: key.as_str(),
            value: JsonValue::new(&pair.value),
        })
    }

    fn end(mut self, count: u64) -> Result<W, Failure> {
        self.line(&EndLine { end: true, count })?;
        self.out
            .into_inner()
            .map_err(|e| write_failed(e.into_error()))
    }
}

fn write_failed(e: io::Error) -> Failure {
    Failure::new(exit::FAILURE, format!("cannot write the dump: {e}"))
}
