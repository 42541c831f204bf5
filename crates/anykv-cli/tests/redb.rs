//! The CLI against a redb file in a temp dir: data persists across
//! invocations, so these tests chain commands the way a user would.

#![cfg(feature = "redb")]

mod common;

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::Duration,
};

use common::{anykv, anykv_stdin, bin, redb_url, run};

fn store() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = redb_url(dir.path(), "test.redb");
    (dir, url)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

#[test]
fn put_then_get_across_invocations() {
    let (_dir, url) = store();
    anykv(&url, &["put", "config/greeting", "hello world"]).ok();
    let out = anykv(&url, &["get", "config/greeting"]);
    // Raw value, no newline added: `$(anykv get k)` and pipes see the bytes.
    assert_eq!(out.stdout, b"hello world");
    assert_eq!(out.code, Some(0));
    anykv(&url, &["get", "config/absent"]).fails(1, "not found: config/absent");
}

#[test]
fn values_from_stdin_and_file_round_trip_exactly() {
    let (dir, url) = store();
    let binary: Vec<u8> = (0..=255u8).chain(b"\n\r\t\\".iter().copied()).collect();
    anykv_stdin(&url, &["put", "bin", "-"], &binary).ok();
    assert_eq!(anykv(&url, &["get", "bin"]).stdout, binary);

    let path = dir.path().join("value.txt");
    std::fs::write(&path, "from a file\n").expect("write");
    let path = path.to_str().expect("utf-8 path");
    anykv(&url, &["put", "file", "--file", path]).ok();
    assert_eq!(anykv(&url, &["get", "file"]).stdout, b"from a file\n");

    // An empty value is a key.
    anykv_stdin(&url, &["put", "empty", "-"], b"").ok();
    let out = anykv(&url, &["get", "empty"]);
    assert_eq!((out.code, out.stdout.len()), (Some(0), 0), "{out:?}");

    // get --json: text as `value`, non-UTF-8 as `value_hex`.
    let v = json(&anykv(&url, &["get", "file", "--json"]).ok());
    assert_eq!(v["key"], "file");
    assert_eq!(v["value"], "from a file\n");
    anykv_stdin(&url, &["put", "raw", "-"], b"\xff\x00").ok();
    let v = json(&anykv(&url, &["get", "raw", "--json"]).ok());
    assert_eq!(v["value_hex"], "ff00");
    assert!(v.get("value").is_none(), "{v}");
}

#[test]
fn conditional_puts() {
    let (_dir, url) = store();
    let v1 = anykv(&url, &["put", "job", "queued", "--if-absent"]).ok();
    let v1 = v1.trim();
    anykv(&url, &["put", "job", "again", "--if-absent"]).fails(3, "already exists: job");

    let v2 = anykv(&url, &["put", "job", "running", "--if-version", v1]).ok();
    assert_ne!(v2.trim(), v1);
    // The old version no longer matches: compare-and-swap fails with exit 3.
    anykv(&url, &["put", "job", "lost-race", "--if-version", v1]).fails(3, "conflict on job");
    assert_eq!(anykv(&url, &["get", "job"]).stdout, b"running");

    anykv(&url, &["put", "job", "done", "--if-present"]).ok();
    anykv(&url, &["del", "job", "--if-version", v1]).fails(3, "conflict on job");
    anykv(&url, &["del", "job", "--if-version", v2.trim()]).fails(3, "conflict on job");
    let current = json(&anykv(&url, &["get", "job", "--json"]).ok())["version"].to_string();
    anykv(&url, &["del", "job", "--if-version", &current]).ok();
    anykv(&url, &["get", "job"]).fails(1, "not found: job");
}

#[test]
fn list_keys_and_delete() {
    let (_dir, url) = store();
    for (k, v) in [
        ("app/a", "1"),
        ("app/b/x", "2"),
        ("app/b/y", "line\nbreak"),
        ("apple", "not below app"),
        ("other", "3"),
    ] {
        anykv(&url, &["put", k, v]).ok();
    }
    let text = anykv(&url, &["list", "app"]).ok();
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split('\t').collect()).collect();
    let keys: Vec<&str> = rows.iter().map(|r| r[0]).collect();
    assert_eq!(keys, ["app/a", "app/b/x", "app/b/y"], "{text}");
    assert!(
        rows.iter()
            .all(|r| r.len() == 3 && r[1].parse::<u64>().is_ok()),
        "{text}"
    );
    assert_eq!(rows[2][2], "line\\nbreak");

    let all = json(&anykv(&url, &["list", "--json"]).ok());
    let all = all.as_array().expect("array");
    assert_eq!(all.len(), 5);
    assert_eq!(all[2]["key"], "app/b/y");
    assert_eq!(all[2]["value"], "line\nbreak");
    assert!(all[2]["mod_revision"].as_u64().is_some());

    assert_eq!(anykv(&url, &["keys", "app"]).ok(), "a\nb\n");
    assert_eq!(anykv(&url, &["keys"]).ok(), "app\napple\nother\n");

    assert_eq!(anykv(&url, &["del", "app/b", "--prefix"]).ok(), "2\n");
    anykv(&url, &["del", "app/a"]).ok();
    anykv(&url, &["del", "app/a"]).fails(1, "not found: app/a");
    assert_eq!(anykv(&url, &["keys"]).ok(), "apple\nother\n");
    assert_eq!(anykv(&url, &["del", "--all"]).ok(), "2\n");
    assert_eq!(anykv(&url, &["list"]).ok(), "");
}

#[test]
fn ttl_expires() {
    let (_dir, url) = store();
    anykv(&url, &["put", "session", "alive", "--ttl", "1s"]).ok();
    std::thread::sleep(Duration::from_millis(1500));
    anykv(&url, &["get", "session"]).fails(1, "not found: session");
}

#[test]
fn default_url_is_a_file_in_the_current_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut put = bin();
    put.current_dir(dir.path()).args(["put", "k", "v"]);
    run(put, None).ok();
    assert!(dir.path().join("anykv.redb").exists());
    let mut get = bin();
    get.current_dir(dir.path()).args(["get", "k"]);
    assert_eq!(run(get, None).stdout, b"v");
}

#[test]
fn url_from_the_environment() {
    let (_dir, url) = store();
    let mut put = bin();
    put.env("ANYKV_URL", &url).args(["put", "k", "from-env"]);
    run(put, None).ok();
    assert_eq!(anykv(&url, &["get", "k"]).stdout, b"from-env");
}

#[test]
fn namespace_prefix_from_the_url() {
    let (_dir, url) = store();
    anykv(&format!("{url}?prefix=tenant-a"), &["put", "k", "a"]).ok();
    anykv(&format!("{url}?prefix=tenant-b"), &["put", "k", "b"]).ok();
    assert_eq!(
        anykv(&format!("{url}?prefix=tenant-a"), &["get", "k"]).stdout,
        b"a"
    );
    assert_eq!(anykv(&url, &["keys"]).ok(), "tenant-a\ntenant-b\n");
}

#[test]
fn lock_passes_increasing_fencing_tokens() {
    let (_dir, url) = store();
    let token = |code: i32| {
        let script = format!("echo $ANYKV_FENCING_TOKEN; exit {code}");
        let out = anykv(&url, &["lock", "jobs/nightly", "--", "sh", "-c", &script]);
        assert_eq!(out.code, Some(code), "{out:?}");
        out.text().trim().parse::<u64>().expect("token")
    };
    let first = token(0);
    let second = token(3);
    // Tokens are persisted in the file: the next holder, in a new process, gets a larger one.
    assert!(second > first, "{first} then {second}");
}

#[test]
fn copy_between_redb_files() {
    let (dir, src) = store();
    let dst = redb_url(dir.path(), "copy.redb");
    for (k, v) in [("config/a", "1"), ("config/b/c", "2"), ("data/x", "3")] {
        anykv(&src, &["put", k, v]).ok();
    }
    let mut c = bin();
    c.args(["copy", &src, &dst, "--prefix", "config"]);
    assert_eq!(run(c, None).ok(), "2\n");
    assert_eq!(anykv(&dst, &["keys"]).ok(), "config\n");
    assert_eq!(anykv(&dst, &["get", "config/b/c"]).stdout, b"2");

    let mut c = bin();
    c.args(["copy", &src, &dst]);
    assert_eq!(run(c, None).ok(), "3\n");
    assert_eq!(anykv(&dst, &["get", "data/x"]).stdout, b"3");

    // Into memory works too (and is gone after the process).
    let mut c = bin();
    c.args(["copy", &src, "memory://"]);
    if cfg!(feature = "memory") {
        assert_eq!(run(c, None).ok(), "3\n");
    }
}

#[test]
fn health_of_a_redb_file() {
    let (_dir, url) = store();
    let text = anykv(&url, &["health"]).ok();
    assert!(text.contains("backend:   redb"), "{text}");
    assert!(text.contains("alive:     yes"), "{text}");
}

#[test]
fn drivers_shows_redb() {
    let text = anykv("memory://", &["drivers"]).ok();
    assert!(text.contains("redb://"), "{text}");
    assert!(text.contains("durable"), "{text}");
}

/// A watch replays history with --from (another process cannot write to the
/// file while the watch holds it), prints one line per event, and ends with
/// exit 0 on SIGTERM. While it runs, a second process gets a one-line
/// "file in use" error, not a hang or a panic, and `health` exits 1.
#[test]
fn watch_replays_events_then_stops_on_sigterm() {
    let (_dir, url) = store();
    anykv(&url, &["put", "app/x", "1"]).ok();
    let first = json(&anykv(&url, &["get", "app/x", "--json"]).ok());
    let rev = first["mod_revision"].as_u64().expect("revision");
    anykv(&url, &["put", "app/x", "two\nlines"]).ok();
    anykv(&url, &["del", "app/x"]).ok();

    let mut child = bin()
        .args([
            "--url",
            &url,
            "watch",
            "--prefix",
            "app",
            "--from",
            &rev.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn watch");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut next = || lines.next().expect("a line").expect("read");
    assert_eq!(next(), format!("put\tapp/x\t{rev}\t1"));
    let second = next();
    assert!(
        second.starts_with("put\tapp/x\t") && second.ends_with("\ttwo\\nlines"),
        "{second}"
    );
    assert!(next().starts_with("delete\tapp/x\t"));

    let busy = anykv(&url, &["get", "app/x"]);
    assert_ne!(busy.code, Some(0), "{busy:?}");
    assert!(busy.stderr.contains("in use"), "{busy:?}");
    assert!(!busy.stderr.contains("panicked"), "{busy:?}");
    // health says so too: the backend is not alive for this process (exit 1).
    let health = anykv(&url, &["health"]);
    health.fails(1, "not alive");
    assert!(health.text().contains("alive:     no"), "{health:?}");

    common::terminate(&child);
    let code = common::wait(&mut child, common::DEADLINE);
    assert_eq!(code, Some(0));
}

#[test]
fn watch_json_lines() {
    let (_dir, url) = store();
    anykv(&url, &["put", "k", "v"]).ok();
    let rev = json(&anykv(&url, &["get", "k", "--json"]).ok())["mod_revision"]
        .as_u64()
        .expect("revision");
    let mut child = bin()
        .args([
            "--url",
            &url,
            "watch",
            "k",
            "--json",
            "--from",
            &rev.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn watch");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = lines.next().expect("a line").expect("read");
    let event = json(&line);
    assert_eq!(event["type"], "put");
    assert_eq!(event["key"], "k");
    assert_eq!(event["value"], "v");
    assert_eq!(event["revision"].as_u64(), Some(rev));
    // Killed outright, as a user closing the terminal would.
    child.kill().expect("kill");
    let _ = child.wait();
}
