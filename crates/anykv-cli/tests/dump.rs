//! `anykv dump` / `anykv restore` through the binary, on redb files (and
//! into `memory://`): round trips of binary, empty and 16 MiB values,
//! restoring under another prefix, and corrupt dumps refused with their
//! line number before anything is written.

#![cfg(feature = "redb")]

mod common;

use std::path::Path;

use common::{Out, anykv, anykv_stdin, bin, patient, redb_url, run};

/// A memory store that lives as long as one `anykv` process.
const MEM: &str = "memory://?timeout=60s";

/// A redb file in `dir`, with a timeout that fits 16 MiB writes.
fn redb(dir: &Path, name: &str) -> String {
    patient(&redb_url(dir, name))
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

/// 16 MiB: the largest value redb and memory take.
const MAX: usize = 16 << 20;

/// The values every round trip carries: text with escapes, every byte,
/// invalid UTF-8, an empty value, and a `big`-byte value that is not UTF-8
/// ([`MAX`] where the test is about size; smaller elsewhere, as a debug
/// build takes seconds per 16 MiB pass).
fn values(big: usize) -> Vec<(&'static str, Vec<u8>)> {
    let big: Vec<u8> = (0..big).map(|i| (i % 251) as u8 | 0x80).collect();
    vec![
        ("app/big", big),
        ("app/bin", (0..=255u8).collect()),
        (
            "app/deep/er/key",
            b"line\n\"quoted\"\t\x01 \\ \xc3\xa9".to_vec(),
        ),
        ("app/empty", Vec::new()),
        ("app/latin1", b"caf\xe9".to_vec()),
    ]
}

/// Fills `url` with [`values`] plus keys outside `app`.
fn fill(dir: &Path, url: &str, big: usize) {
    for (i, (k, v)) in values(big).iter().enumerate() {
        let file = dir.join(format!("v{i}"));
        std::fs::write(&file, v).expect("write value");
        anykv(url, &["put", k, "--file", file.to_str().expect("utf-8")]).ok();
    }
    anykv(url, &["put", "apple", "not below app"]).ok();
    anykv(url, &["put", "other/x", "1"]).ok();
}

/// Every key below `prefix` with its exact value, read with `get` (not
/// through a dump, so the dump's encoding is not checked against itself).
fn assert_holds(url: &str, prefix: &str, big: usize) {
    let listed: Vec<String> = anykv(url, &["list", prefix])
        .ok()
        .lines()
        .map(|l| l.split('\t').next().expect("key").to_owned())
        .collect();
    let want: Vec<String> = values(big)
        .iter()
        .map(|(k, _)| k.replacen("app", prefix, 1))
        .collect();
    assert_eq!(listed, want);
    for (k, v) in values(big) {
        let key = k.replacen("app", prefix, 1);
        let got = anykv(url, &["get", &key]);
        assert_eq!(got.code, Some(0), "{key}: {}", got.stderr);
        assert!(got.stdout == v, "value of {key} differs");
    }
}

fn header(dump: &[u8]) -> serde_json::Value {
    let first = dump.split(|b| *b == b'\n').next().expect("a line");
    serde_json::from_slice(first).expect("header is JSON")
}

/// Whether this build's driver for `name` declares snapshot (`drivers --json`).
fn has_snapshot(name: &str) -> bool {
    let all = json(&anykv("memory://", &["drivers", "--json"]).ok());
    let d = all
        .as_array()
        .expect("array")
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no driver {name}"));
    !d["capabilities"]["snapshot"].is_null()
}

fn assert_header(dump: &[u8], backend: &str, prefix: &str) {
    let h = header(dump);
    assert_eq!(h["format"], "anykv-dump", "{h}");
    assert_eq!(h["version"], 1, "{h}");
    assert_eq!(h["backend"], backend, "{h}");
    assert_eq!(h["prefix"], prefix, "{h}");
    assert!(
        h["created"].as_str().is_some_and(|c| c.ends_with('Z')),
        "{h}"
    );
    // Consistent exactly when the backend declares snapshot, and then with
    // the revision the pairs were read at.
    let consistent = has_snapshot(backend);
    assert_eq!(h["consistent"], consistent, "{h}");
    assert_eq!(h["revision"].is_u64(), consistent, "{h}");
    assert_eq!(h["note"].is_string(), !consistent, "{h}");
}

#[test]
fn redb_to_redb_round_trip_through_a_pipe_and_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = redb(dir.path(), "src.redb");
    fill(dir.path(), &src, MAX);

    // To stdout; keys relative to the prefix, sorted, then the end line.
    let dump = anykv(&src, &["dump", "--prefix", "app"]);
    assert_eq!(dump.code, Some(0), "{}", dump.stderr);
    assert_header(&dump.stdout, "redb", "app");
    let lines: Vec<&[u8]> = dump.stdout.split(|b| *b == b'\n').collect();
    assert_eq!(
        lines.len(),
        1 + 5 + 1 + 1,
        "header, pairs, end, final newline"
    );
    let second = json(std::str::from_utf8(lines[2]).expect("utf-8"));
    assert_eq!(second["key"], "bin");
    assert_eq!(second["value_hex"].as_str().map(str::len), Some(512));
    let empty = json(std::str::from_utf8(lines[4]).expect("utf-8"));
    assert_eq!(
        (&empty["key"], &empty["value"]),
        (&"empty".into(), &"".into())
    );
    assert_eq!(lines[6], br#"{"end":true,"count":5}"#);

    // Piped into restore (spooled), under the dump's own prefix.
    let dst = redb(dir.path(), "dst.redb");
    assert_eq!(anykv_stdin(&dst, &["restore"], &dump.stdout).ok(), "5\n");
    assert_holds(&dst, "app", MAX);
    assert_eq!(anykv(&dst, &["keys"]).ok(), "app\n");

    // Via --file on both sides, restored under another prefix.
    let file = dir.path().join("app.jsonl");
    let file = file.to_str().expect("utf-8");
    assert_eq!(
        anykv(&src, &["dump", "--prefix", "app", "--file", file]).ok(),
        ""
    );
    let written = std::fs::read(file).expect("dump file");
    // Written beside FILE under a temporary name, then renamed: none is left.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".anykv-dump-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The same pairs (the header's `created` may differ by a second).
    assert_eq!(pair_lines(&written), pair_lines(&dump.stdout));
    let restored = anykv(&dst, &["restore", "--file", file, "--prefix", "copy/of"]);
    assert_eq!(restored.ok(), "5\n");
    assert_holds(&dst, "copy/of", MAX);

    // A dump of the restored copy has the same pairs.
    let again = anykv(&dst, &["dump", "--prefix", "copy/of"]);
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    assert_eq!(pair_lines(&again.stdout), pair_lines(&dump.stdout));
}

/// The lines after the header: pairs and the end line.
fn pair_lines(dump: &[u8]) -> Vec<&[u8]> {
    dump.split(|b| *b == b'\n').skip(1).collect()
}

#[test]
fn stdin_redirected_from_a_file_is_read_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = redb(dir.path(), "src.redb");
    fill(dir.path(), &src, 4096);
    let file = dir.path().join("all.jsonl");
    anykv(&src, &["dump", "--file", file.to_str().expect("utf-8")]).ok();
    let dst = redb(dir.path(), "dst.redb");
    let mut cmd = bin();
    cmd.args(["--url", &dst, "restore", "--prefix", "whole"])
        .stdin(std::fs::File::open(&file).expect("open"));
    let out = run_with_stdin_file(cmd);
    assert_eq!(out.ok(), "7\n");
    assert_holds(&dst, "whole/app", 4096);
    assert_eq!(anykv(&dst, &["get", "whole/other/x"]).stdout, b"1");
}

/// `run` with the stdin already set on `cmd` (here: a file, not a pipe).
fn run_with_stdin_file(mut cmd: std::process::Command) -> Out {
    use std::process::Stdio;
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out = child.wait_with_output().expect("wait");
    Out {
        code: out.status.code(),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn redb_to_memory_and_a_memory_dump() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = redb(dir.path(), "src.redb");
    fill(dir.path(), &src, MAX);
    let dump = anykv(&src, &["dump", "--prefix", "app"]);
    assert_eq!(dump.code, Some(0), "{}", dump.stderr);
    // memory takes the 16 MiB value too (the store ends with the process).
    assert_eq!(anykv_stdin(MEM, &["restore"], &dump.stdout).ok(), "5\n");
    // An (empty) memory dump states whether it is consistent.
    let empty = anykv(MEM, &["dump"]);
    assert_eq!(empty.code, Some(0), "{}", empty.stderr);
    assert_header(&empty.stdout, "memory", "");
    assert_eq!(
        pair_lines(&empty.stdout),
        [&br#"{"end":true,"count":0}"#[..], b""]
    );
    assert_eq!(anykv_stdin(MEM, &["restore"], &empty.stdout).ok(), "0\n");
}

#[test]
fn clean_deletes_what_the_dump_lacks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = redb(dir.path(), "s.redb");
    anykv(&url, &["put", "cfg/a", "1"]).ok();
    anykv(&url, &["put", "cfg/b", "2"]).ok();
    let dump = anykv(&url, &["dump", "--prefix", "cfg"]);
    anykv(&url, &["put", "cfg/a", "changed"]).ok();
    anykv(&url, &["put", "cfg/new", "3"]).ok();
    anykv(&url, &["put", "cfgx", "outside"]).ok();

    // Default: overwrite what the dump has, keep the rest. (--file naming a
    // pipe, as `--file <(anykv dump)` does, is spooled like stdin.)
    let piped = anykv_stdin(&url, &["restore", "--file", "/dev/stdin"], &dump.stdout);
    assert_eq!(piped.ok(), "2\n");
    assert_eq!(anykv(&url, &["get", "cfg/a"]).stdout, b"1");
    assert_eq!(anykv(&url, &["get", "cfg/new"]).stdout, b"3");
    // --clean: the prefix then holds exactly the dump; nothing else is touched.
    assert_eq!(
        anykv_stdin(&url, &["restore", "--clean"], &dump.stdout).ok(),
        "2\n"
    );
    assert_eq!(anykv(&url, &["keys", "cfg"]).ok(), "a\nb\n");
    assert_eq!(anykv(&url, &["get", "cfgx"]).stdout, b"outside");
}

/// Each corrupt variant of a dump is refused with exit 2 and its line
/// number, and the target store is left exactly as it was.
#[test]
fn corrupt_dumps_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = redb(dir.path(), "src.redb");
    for i in 0..8 {
        anykv(&src, &["put", &format!("k/{i}"), &format!("v{i}")]).ok();
    }
    let dump = anykv(&src, &["dump"]).ok();
    let lines: Vec<String> = dump.lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 10, "{dump}");

    let dst = redb(dir.path(), "dst.redb");
    anykv(&dst, &["put", "k/0", "untouched"]).ok();
    let before = anykv(&dst, &["list", "--json"]).ok();

    let edit = |line: usize, text: &str| {
        let mut l = lines.clone();
        l[line - 1] = text.to_owned();
        l.join("\n") + "\n"
    };
    let cases: Vec<(String, &str)> = vec![
        (
            edit(7, r#"{"key":"k/5","value":"v5""#),
            "line 7: not a dump line",
        ),
        (
            edit(1, r#"{"format":"zip","version":1}"#),
            "line 1: not an anykv dump header",
        ),
        (edit(1, "PK\u{3}\u{4}"), "line 1: not an anykv dump header"),
        (
            edit(4, r#"{"key":"k/2","value_hex":"7g"}"#),
            "line 4: key \"k/2\": value_hex has a non-hex character 'g'",
        ),
        (
            edit(5, r#"{"key":"k/1","value":"again"}"#),
            "line 5: duplicate key \"k/1\" (first on line 3)",
        ),
        (
            edit(6, r#"{"key":"k//4","value":"v4"}"#),
            "line 6: invalid key",
        ),
        (
            lines[..9].join("\n"),
            "line 9: the dump ends without its end line",
        ),
    ];
    for (text, needle) in &cases {
        // Piped (spooled) and from a file: the same refusal.
        anykv_stdin(&dst, &["restore"], text.as_bytes()).fails(2, needle);
        let file = dir.path().join("bad.jsonl");
        std::fs::write(&file, text).expect("write");
        let out = anykv(&dst, &["restore", "--file", file.to_str().expect("utf-8")]);
        out.fails(2, needle);
        assert!(out.stderr.contains("nothing was restored"), "{out:?}");
        assert_eq!(anykv(&dst, &["list", "--json"]).ok(), before, "{needle}");
    }
    // The intact dump restores.
    assert_eq!(anykv_stdin(&dst, &["restore"], dump.as_bytes()).ok(), "8\n");
    assert_eq!(anykv(&dst, &["get", "k/0"]).stdout, b"v0");
}

#[test]
fn bad_arguments_and_files_fail_before_the_store() {
    // A bad prefix is exit 2 before any connection.
    anykv("nosuch://x", &["dump", "--prefix", "a//b"]).fails(2, "invalid key");
    anykv("nosuch://x", &["restore", "--prefix", "/a"]).fails(2, "must not start with '/'");
    anykv(
        "nosuch://x",
        &["restore", "--file", "/nonexistent/dump.jsonl"],
    )
    .fails(2, "cannot read /nonexistent/dump.jsonl");
    // A refused dump never opens the store: no redb file appears.
    let dir = tempfile::tempdir().expect("tempdir");
    let url = redb(dir.path(), "never.redb");
    anykv_stdin(&url, &["restore"], b"not json\n").fails(2, "line 1");
    assert!(!dir.path().join("never.redb").exists());
    // dump to a file in a missing directory: exit 2, one line.
    let src = redb(dir.path(), "src.redb");
    let mut cmd = bin();
    cmd.args([
        "--url",
        &src,
        "dump",
        "--file",
        "/nonexistent/dir/out.jsonl",
    ]);
    run(cmd, None).fails(2, "cannot create /nonexistent/dir/out.jsonl");
    // A dump that fails leaves an earlier FILE as it was.
    let earlier = dir.path().join("earlier.jsonl");
    std::fs::write(&earlier, "the last good dump\n").expect("write");
    let path = earlier.to_str().expect("utf-8");
    anykv("nosuch://x", &["dump", "--file", path]).fails(2, "unknown backend");
    anykv("memory://?bogus=1", &["dump", "--file", path]).fails(2, "unknown option");
    assert_eq!(
        std::fs::read(&earlier).expect("read"),
        b"the last good dump\n"
    );
}
