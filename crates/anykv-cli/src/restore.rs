//! `anykv restore [--prefix P] [--file FILE] [--clean]`: writes a dump (format
//! in [`crate::dumpfile`]) back, after checking all of it.
//!
//! Two passes. The first ([`check`], before any store is opened) reads the
//! whole input and refuses it, naming the line, unless the header is a
//! known format and version, every line parses, every key is valid under
//! the target prefix, every value decodes, no key repeats and the end line
//! counts the pairs; a pipe is spooled to an unnamed temp file on the way
//! (a regular file, or stdin redirected from one, is read twice in place).
//! The first pass holds one line and the set of keys, never the values.
//! Then the largest value is checked against the target's
//! `max_value_size`, and only then the second pass writes, in `atomic`
//! batches bounded by the backend's `max_atomic_ops` and by half its
//! `max_value_size` in bytes (a request-size proxy: etcd, Consul and
//! ZooKeeper bound a transaction's size near their value limit); a pair too
//! large for a batch is a plain `put`.
//!
//! Keys already present are overwritten; keys below the prefix that the
//! dump lacks stay, unless `--clean` deletes the prefix first. Each batch
//! is atomic, the restore as a whole is not: if a write fails, the batches
//! before it stay written (the error says how many pairs), and running the
//! same restore again converges.

use std::{
    collections::HashMap,
    fs::File,
    io::{self, BufRead, BufReader, BufWriter, Seek, SeekFrom, Write},
    path::PathBuf,
};

use anykv::{ErrorKind, Key, Kv, Op, Prefix, PutOptions, Store};
use bytes::Bytes;

use crate::{
    dumpfile::{FORMAT, HeaderIn, LineIn, Read1, VERSION, max_line, read_line},
    exit::{self, Failure},
    output::{self, JsonValue},
};

/// Most operations per batch when the backend sets no bound.
const DEFAULT_BATCH_OPS: usize = 256;

/// A checked dump, ready to write.
#[derive(Debug)]
pub struct RestorePlan {
    /// The dump, positioned at its first byte.
    input: File,
    /// Where the dump starts in `input` (stdin may not be at offset 0).
    start: u64,
    /// Where the pairs go.
    target: Prefix,
    /// Number of pairs.
    pairs: u64,
    /// The largest value, to check against the target's limit.
    largest: Option<Largest>,
    /// Delete the target prefix before writing.
    clean: bool,
}

#[derive(Debug)]
struct Largest {
    size: usize,
    line: u64,
    key: String,
}

/// First pass: reads and checks the dump from `file` (stdin when None or
/// `-`). `prefix` overrides the header's. Touches no store.
pub fn check(
    file: Option<PathBuf>,
    prefix: Option<String>,
    clean: bool,
) -> Result<RestorePlan, Failure> {
    let prefix = prefix.map(Prefix::new).transpose()?;
    let (name, input) = match file.filter(|p| p.as_os_str() != "-") {
        Some(path) => {
            let f = File::open(&path)
                .map_err(|e| Failure::usage(format!("cannot read {}: {e}", path.display())))?;
            (path.display().to_string(), Input::of(f))
        }
        None => ("stdin".to_owned(), stdin()),
    };
    let read_failed = |e: io::Error| Failure::usage(format!("cannot read {name}: {e}"));
    let (input, start, checked) = match input {
        Input::Seekable(mut f) => {
            let start = f.stream_position().map_err(read_failed)?;
            let checked = validate(&mut BufReader::new(&f), None::<&mut File>, prefix)
                .map_err(|e| e.failure(&name))?;
            (f, start, checked)
        }
        Input::Pipe(pipe) => {
            let spool = tempfile::tempfile()
                .map_err(|e| Failure::usage(format!("cannot create a temp file: {e}")))?;
            let mut w = BufWriter::new(spool);
            let checked = validate(&mut BufReader::new(pipe), Some(&mut w), prefix)
                .map_err(|e| e.failure(&name))?;
            let spool = w.into_inner().map_err(|e| read_failed(e.into_error()))?;
            (spool, 0, checked)
        }
    };
    Ok(RestorePlan {
        input,
        start,
        target: checked.target,
        pairs: checked.pairs,
        largest: checked.largest,
        clean,
    })
}

/// Where the dump comes from: a regular file is read twice in place;
/// anything else (a pipe, a FIFO, `<(anykv dump)`) is spooled.
enum Input {
    Seekable(File),
    Pipe(Box<dyn io::Read>),
}

impl Input {
    fn of(f: File) -> Self {
        if f.metadata().is_ok_and(|m| m.is_file()) {
            Input::Seekable(f)
        } else {
            Input::Pipe(Box::new(f))
        }
    }
}

/// Stdin, as a file when it is one (`< dump.jsonl`) so it needs no spool.
fn stdin() -> Input {
    #[cfg(unix)]
    {
        use std::os::fd::AsFd;
        if let Ok(fd) = io::stdin().as_fd().try_clone_to_owned() {
            return Input::of(File::from(fd));
        }
    }
    Input::Pipe(Box::new(io::stdin()))
}

/// Why a dump was refused: the line (0: none) and the reason.
#[derive(Debug)]
pub struct Invalid {
    line: u64,
    reason: String,
    /// Reading failed (exit 2 as well, but worded as a read error).
    io: bool,
}

impl Invalid {
    fn at(line: u64, reason: impl Into<String>) -> Self {
        Invalid {
            line,
            reason: reason.into(),
            io: false,
        }
    }

    /// The one-line message, naming the input.
    pub fn failure(&self, name: &str) -> Failure {
        if self.io {
            return Failure::usage(format!("cannot read {name}: {}", self.reason));
        }
        Failure::usage(format!(
            "invalid dump: {name} line {}: {} (nothing was restored)",
            self.line, self.reason
        ))
    }
}

/// What the first pass learnt.
#[derive(Debug)]
pub struct Checked {
    /// Where the pairs go.
    pub target: Prefix,
    /// Number of pairs.
    pairs: u64,
    largest: Option<Largest>,
}

/// Checks a whole dump, copying its lines to `spool` if given.
pub fn validate(
    input: &mut impl BufRead,
    mut spool: Option<&mut impl Write>,
    prefix: Option<Prefix>,
) -> Result<Checked, Invalid> {
    let limit = max_line();
    let mut buf = Vec::new();
    let mut n: u64 = 1;
    let io_err = |e: io::Error| Invalid {
        line: 0,
        reason: e.to_string(),
        io: true,
    };
    let mut next = |buf: &mut Vec<u8>, n: u64| -> Result<bool, Invalid> {
        match read_line(input, buf, limit).map_err(io_err)? {
            Read1::Eof => Ok(false),
            Read1::TooLong => Err(Invalid::at(n, format!("longer than {limit} bytes"))),
            Read1::Line => {
                if let Some(s) = spool.as_mut() {
                    s.write_all(buf).map_err(io_err)?;
                    s.write_all(b"\n").map_err(io_err)?;
                }
                Ok(true)
            }
        }
    };
    if !next(&mut buf, n)? {
        return Err(Invalid::at(1, "empty input, no dump header"));
    }
    let header_prefix = header(&buf)?;
    let target = prefix.unwrap_or(header_prefix);
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut largest: Option<Largest> = None;
    loop {
        n += 1;
        if !next(&mut buf, n)? {
            return Err(Invalid::at(
                n - 1,
                "the dump ends without its end line {\"end\":true,\"count\":N}: it is incomplete",
            ));
        }
        match parse_line(&buf, &target).map_err(|r| Invalid::at(n, r))? {
            Parsed::End(count) => {
                if count != seen.len() as u64 {
                    return Err(Invalid::at(
                        n,
                        format!(
                            "the end line counts {count} pairs, the dump has {}",
                            seen.len()
                        ),
                    ));
                }
                if next(&mut buf, n + 1)? {
                    return Err(Invalid::at(n + 1, "data after the end line"));
                }
                break;
            }
            Parsed::Pair { rel, key: _, value } => {
                if largest.as_ref().is_none_or(|l| value.len() > l.size) {
                    largest = Some(Largest {
                        size: value.len(),
                        line: n,
                        key: rel.clone(),
                    });
                }
                if let Some(first) = seen.insert(rel.clone(), n) {
                    return Err(Invalid::at(
                        n,
                        format!("duplicate key {rel:?} (first on line {first})"),
                    ));
                }
            }
        }
    }
    if let Some(s) = spool.as_mut() {
        s.flush().map_err(io_err)?;
    }
    Ok(Checked {
        target,
        pairs: seen.len() as u64,
        largest,
    })
}

/// Checks the header; returns the dumped prefix.
fn header(line: &[u8]) -> Result<Prefix, Invalid> {
    let not_header = |why: String| {
        Invalid::at(
            1,
            format!(
                "not an anykv dump header ({why}); expected {{\"format\":\"{FORMAT}\",\"version\":{VERSION},…}}"
            ),
        )
    };
    let h: HeaderIn = serde_json::from_slice(line).map_err(|e| not_header(e.to_string()))?;
    match h.format.as_deref() {
        Some(FORMAT) => {}
        Some(other) => return Err(not_header(format!("format is {other:?}"))),
        None => return Err(not_header("no \"format\"".to_owned())),
    }
    match h.version {
        Some(VERSION) => {}
        Some(v) => {
            return Err(Invalid::at(
                1,
                format!(
                    "dump format version {v} is not supported (this anykv reads version {VERSION})"
                ),
            ));
        }
        None => return Err(not_header("no \"version\"".to_owned())),
    }
    let prefix = h
        .prefix
        .ok_or_else(|| not_header("no \"prefix\"".to_owned()))?;
    Prefix::new(prefix).map_err(|e| Invalid::at(1, format!("header prefix: {e}")))
}

/// A line after the header.
enum Parsed {
    Pair {
        /// The key as written (relative to the dumped prefix).
        rel: String,
        /// The key under the target prefix.
        key: Key,
        value: Vec<u8>,
    },
    End(u64),
}

fn parse_line(line: &[u8], target: &Prefix) -> Result<Parsed, String> {
    let l: LineIn = serde_json::from_slice(line).map_err(|e| format!("not a dump line: {e}"))?;
    if l.end == Some(true) {
        return l
            .count
            .map(Parsed::End)
            .ok_or_else(|| "the end line has no \"count\"".to_owned());
    }
    let rel = l
        .key
        .ok_or_else(|| "no \"key\" (and not the end line)".to_owned())?;
    let value = JsonValue::decode(l.value, l.value_hex).map_err(|e| format!("key {rel:?}: {e}"))?;
    let full = if target.is_root() {
        rel.clone()
    } else {
        format!("{}/{rel}", target.as_str())
    };
    let key = Key::new(full).map_err(|e| e.to_string())?;
    Ok(Parsed::Pair { rel, key, value })
}

/// Second pass: writes the checked dump and prints the number of pairs.
pub async fn run(kv: &Kv, mut plan: RestorePlan) -> Result<u8, Failure> {
    let max = kv.capabilities().max_value_size;
    if let Some(l) = &plan.largest
        && l.size > max
    {
        return Err(Failure::new(
            exit::code_for(ErrorKind::ValueTooLarge),
            format!(
                "invalid dump: line {}: the value of {:?} is {} bytes; {} takes at most {max} (nothing was restored)",
                l.line,
                l.key,
                l.size,
                kv.backend()
            ),
        ));
    }
    if plan.clean {
        kv.delete_prefix(&plan.target).await?;
    }
    plan.input
        .seek(SeekFrom::Start(plan.start))
        .map_err(|e| Failure::new(exit::FAILURE, format!("cannot reread the dump: {e}")))?;
    let n = write(
        kv,
        &mut BufReader::new(plan.input),
        &plan.target,
        plan.pairs,
    )
    .await?;
    output::println(&n.to_string())?;
    Ok(exit::OK)
}

/// Writes the pairs of a validated dump under `target`; returns how many.
pub async fn write(
    kv: &Kv,
    input: &mut impl BufRead,
    target: &Prefix,
    total: u64,
) -> Result<u64, Failure> {
    let caps = kv.capabilities();
    let mut batch = Batch {
        kv,
        ops: Vec::new(),
        bytes: 0,
        max_ops: caps.max_atomic_ops.unwrap_or(DEFAULT_BATCH_OPS).max(1),
        budget: (caps.max_value_size / 2).max(1),
        atomic: true,
        written: 0,
    };
    let outcome = async {
        let limit = max_line();
        let mut buf = Vec::new();
        let mut n: u64 = 0;
        loop {
            n += 1;
            let changed = || {
                Failure::new(
                    exit::FAILURE,
                    format!("the dump changed after it was checked (line {n})"),
                )
            };
            match read_line(input, &mut buf, limit)
                .map_err(|e| Failure::new(exit::FAILURE, format!("cannot reread the dump: {e}")))?
            {
                Read1::Line => {}
                Read1::Eof | Read1::TooLong => return Err(changed()),
            }
            if n == 1 {
                continue; // the header, checked in the first pass
            }
            match parse_line(&buf, target).map_err(|_| changed())? {
                Parsed::End(_) => return Ok(()),
                Parsed::Pair { key, value, .. } => batch.push(key, Bytes::from(value)).await?,
            }
        }
    }
    .await;
    let outcome = match outcome {
        Ok(()) => batch.flush().await,
        Err(e) => Err(e),
    };
    outcome.map_err(|f| {
        Failure::new(
            f.code,
            format!("restored {} of {total} pairs, then: {f}", batch.written),
        )
    })?;
    Ok(batch.written)
}

/// Pending writes, sent as one `atomic` when the next would exceed the
/// backend's operation bound or the byte budget.
struct Batch<'a> {
    kv: &'a Kv,
    ops: Vec<Op>,
    bytes: usize,
    max_ops: usize,
    budget: usize,
    /// False once the backend refused `atomic` as unsupported: plain puts.
    atomic: bool,
    written: u64,
}

impl Batch<'_> {
    async fn push(&mut self, key: Key, value: Bytes) -> Result<(), Failure> {
        let size = key.as_str().len() + value.len();
        if size > self.budget {
            self.flush().await?;
            self.kv.put(&key, value, PutOptions::default()).await?;
            self.written += 1;
            return Ok(());
        }
        if self.ops.len() >= self.max_ops || self.bytes + size > self.budget {
            self.flush().await?;
        }
        self.ops.push(Op::Put(key, value));
        self.bytes += size;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Failure> {
        let ops = std::mem::take(&mut self.ops);
        self.bytes = 0;
        if ops.is_empty() {
            return Ok(());
        }
        if self.atomic {
            match self.kv.atomic(Vec::new(), ops.clone()).await {
                Ok(_) => {
                    self.written += ops.len() as u64;
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Unsupported => self.atomic = false,
                Err(e) => return Err(e.into()),
            }
        }
        for op in ops {
            if let Op::Put(key, value) = op {
                self.kv.put(&key, value, PutOptions::default()).await?;
                self.written += 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid dump of `pairs` (key, JSON value fields) under `prefix`.
    fn dump(prefix: &str, pairs: &[(&str, &str)]) -> String {
        let mut s = format!(
            "{{\"format\":\"anykv-dump\",\"version\":1,\"backend\":\"test\",\"revision\":7,\"consistent\":true,\"prefix\":\"{prefix}\",\"created\":\"2026-11-30T04:00:00Z\"}}\n"
        );
        for (k, v) in pairs {
            s.push_str(&format!("{{\"key\":\"{k}\",{v}}}\n"));
        }
        s.push_str(&format!("{{\"end\":true,\"count\":{}}}\n", pairs.len()));
        s
    }

    fn check(text: &str, prefix: Option<&str>) -> Result<Checked, Invalid> {
        let prefix = prefix.map(|p| Prefix::new(p).expect("prefix"));
        validate(&mut text.as_bytes(), None::<&mut Vec<u8>>, prefix)
    }

    fn refused(text: &str, line: u64, needle: &str) {
        let e = check(text, None).expect_err("refused");
        assert_eq!(e.line, line, "{e:?}");
        assert!(e.reason.contains(needle), "{needle:?} not in {e:?}");
        let msg = e.failure("f.jsonl").message.expect("message");
        assert!(
            msg.starts_with(&format!("invalid dump: f.jsonl line {line}: ")),
            "{msg}"
        );
    }

    fn seven() -> Vec<(&'static str, &'static str)> {
        vec![
            ("a", r#""value":"1""#),
            ("b", r#""value_hex":"ff00""#),
            ("c", r#""value":"""#),
            ("d/e", r#""value":"x\ny""#),
            ("f", r#""value":"3""#),
            ("g", r#""value":"4""#),
            ("h", r#""value":"5""#),
        ]
    }

    #[test]
    fn a_valid_dump_is_counted_under_its_prefix_or_another() {
        let text = dump("app", &seven());
        let c = check(&text, None).expect("valid");
        assert_eq!((c.target.as_str(), c.pairs), ("app", 7));
        let l = c.largest.expect("largest");
        assert_eq!((l.size, l.line, l.key.as_str()), (3, 5, "d/e"));
        assert_eq!(check(&text, Some("")).expect("valid").target.as_str(), "");
        // CRLF line ends are accepted (a dump that went through Windows).
        let crlf = text.replace('\n', "\r\n");
        assert_eq!(check(&crlf, Some("x")).expect("valid").pairs, 7);
    }

    #[test]
    fn corrupt_dumps_are_refused_with_the_line() {
        let mut lines: Vec<String> = dump("app", &seven()).lines().map(str::to_owned).collect();
        // Line 7 (the sixth pair) cut in the middle of its JSON.
        let mut bad = lines.clone();
        bad[6] = r#"{"key":"g","value":"4"#.to_owned();
        refused(&bad.join("\n"), 7, "not a dump line");
        let mut bad = lines.clone();
        bad[6] = String::new();
        refused(&bad.join("\n"), 7, "not a dump line");

        refused(
            &lines[1..].join("\n"),
            1,
            "not an anykv dump header (no \"format\")",
        );
        refused("", 1, "empty input");
        let mut bad = lines.clone();
        bad[0] = bad[0].replace("anykv-dump", "tar");
        refused(&bad.join("\n"), 1, "format is \"tar\"");
        let mut bad = lines.clone();
        bad[0] = bad[0].replace("\"version\":1", "\"version\":2");
        refused(&bad.join("\n"), 1, "version 2 is not supported");
        let mut bad = lines.clone();
        bad[0] = bad[0].replace("\"prefix\":\"app\"", "\"prefix\":\"/app\"");
        refused(&bad.join("\n"), 1, "header prefix");

        let mut bad = lines.clone();
        bad[2] = r#"{"key":"b","value_hex":"f"}"#.to_owned();
        refused(
            &bad.join("\n"),
            3,
            "key \"b\": value_hex has an odd number of digits",
        );
        bad[2] = r#"{"key":"b","value_hex":"xy"}"#.to_owned();
        refused(&bad.join("\n"), 3, "non-hex character 'x'");
        bad[2] = r#"{"key":"b","value":"1","value_hex":"00"}"#.to_owned();
        refused(&bad.join("\n"), 3, "both");
        bad[2] = r#"{"key":"b"}"#.to_owned();
        refused(&bad.join("\n"), 3, "neither");
        bad[2] = r#"{"value":"1"}"#.to_owned();
        refused(&bad.join("\n"), 3, "no \"key\"");
        bad[2] = r#"{"key":"b//c","value":"1"}"#.to_owned();
        refused(&bad.join("\n"), 3, "empty segment");
        bad[2] = r#"{"key":5,"value":"1"}"#.to_owned();
        refused(&bad.join("\n"), 3, "not a dump line");

        let mut bad = lines.clone();
        bad[5] = r#"{"key":"a","value":"again"}"#.to_owned();
        refused(&bad.join("\n"), 6, "duplicate key \"a\" (first on line 2)");

        // Cut short: no end line, a wrong count, data after the end.
        let last = lines.pop().expect("end line");
        refused(&lines.join("\n"), 8, "without its end line");
        let wrong = lines.join("\n") + "\n{\"end\":true,\"count\":6}";
        refused(&wrong, 9, "counts 6 pairs, the dump has 7");
        let after = format!(
            "{}\n{last}\n{{\"key\":\"z\",\"value\":\"\"}}\n",
            lines.join("\n")
        );
        refused(&after, 10, "data after the end line");
    }

    #[test]
    fn keys_are_checked_under_the_target_prefix() {
        // Valid below `app`, but `__anykv` is reserved at the top level.
        let text = dump("app", &[("__anykv/x", r#""value":"1""#)]);
        assert!(check(&text, None).is_ok());
        let e = check(&text, Some("")).expect_err("reserved at the top");
        assert_eq!(e.line, 2);
        assert!(e.reason.contains("reserved"), "{e:?}");
        // Too long once joined.
        let long = "k".repeat(1020);
        let text = dump("", &[(&long, r#""value":"1""#)]);
        assert!(check(&text, None).is_ok());
        let e = check(&text, Some("longer")).expect_err("too long");
        assert!(e.reason.contains("longer than 1024"), "{e:?}");
    }

    #[test]
    fn a_pipe_is_spooled_line_by_line() {
        let text = dump("app", &seven()).replace('\n', "\r\n");
        let mut spool = Vec::new();
        validate(&mut text.as_bytes(), Some(&mut spool), None).expect("valid");
        assert_eq!(
            String::from_utf8(spool).expect("utf-8"),
            text.replace("\r\n", "\n")
        );
    }

    /// memory → redb in one process (a memory store does not outlive an
    /// `anykv` process, so the binary cannot dump one it filled).
    #[cfg(all(feature = "memory", feature = "redb"))]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_to_redb_round_trip_with_16_mib() {
        use anykv::StoreExt;

        let src = anykv::open("memory://?timeout=60s").await.expect("memory");
        let binary: Vec<u8> = (0..=255u8).rev().collect();
        let big: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
        let pairs: Vec<(&str, Vec<u8>)> = vec![
            ("app/big", big),
            ("app/bin", binary),
            ("app/deep/er/key", b"line\n\"quoted\"\t\x01".to_vec()),
            ("app/empty", Vec::new()),
            ("app/text", "é€ text".as_bytes().to_vec()),
        ];
        for (k, v) in &pairs {
            src.set(k, v.clone()).await.expect("put");
        }
        src.set("apple", "not below app").await.expect("put");

        let mut buf = Vec::new();
        let app = Prefix::new("app").expect("prefix");
        let (n, _) = crate::dump::write(&src, &app, || Ok(&mut buf))
            .await
            .expect("dump");
        assert_eq!(n, 5);
        let header: serde_json::Value =
            serde_json::from_slice(buf.split(|b| *b == b'\n').next().expect("header"))
                .expect("json");
        let consistent = src.capabilities().snapshot.is_some();
        assert_eq!(header["consistent"], consistent, "{header}");
        assert_eq!(header["revision"].is_u64(), consistent, "{header}");
        assert_eq!(
            (&header["backend"], &header["prefix"]),
            (&"memory".into(), &"app".into())
        );

        let target = Prefix::new("restored").expect("prefix");
        let checked =
            validate(&mut &buf[..], None::<&mut Vec<u8>>, Some(target.clone())).expect("valid");
        assert_eq!(checked.pairs, 5);
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!(
            "redb://{}?timeout=60s",
            dir.path().join("dst.redb").display()
        );
        let dst = anykv::open(&url).await.expect("redb");
        let written = write(&dst, &mut &buf[..], &target, checked.pairs)
            .await
            .expect("restore");
        assert_eq!(written, 5);
        let got = dst.list(&target).await.expect("list");
        assert_eq!(got.len(), pairs.len());
        for ((k, v), kv) in pairs.iter().zip(&got) {
            assert_eq!(kv.key.as_str(), k.replacen("app/", "restored/", 1));
            assert!(kv.value == v[..], "value of {k} differs");
        }
        dst.close().await.expect("close");
        src.close().await.expect("close");
    }
}
