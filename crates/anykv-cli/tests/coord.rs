//! `anykv elect`, `leader` and `register`: on memory (in-process sessions:
//! one `anykv` process is the whole store) and against real etcd, Consul
//! and ZooKeeper servers (URLs from `ANYKV_TEST_ETCD`, `ANYKV_TEST_CONSUL`,
//! `ANYKV_TEST_ZK`; skipped when unset, required under `cargo xtask test`).
//!
//! A backend that does not declare sessions (`anykv drivers --json`:
//! `sessions_granularity_ms` null) must refuse `elect` and `register` with
//! exit 2 and "unsupported"; one that declares them must run the scenarios.

mod common;

use std::{
    io::Read,
    path::Path,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::{anykv, bin, terminate, wait};

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

/// Whether `backend` declares sessions, from `anykv drivers --json`.
fn has_sessions(backend: &str) -> bool {
    let all = json(&anykv("memory://", &["drivers", "--json"]).ok());
    let driver = all
        .as_array()
        .expect("array")
        .iter()
        .find(|d| d["name"] == backend)
        .unwrap_or_else(|| panic!("no driver {backend}"))
        .clone();
    !driver["capabilities"]["sessions_granularity_ms"].is_null()
}

/// A name no other run uses.
fn fresh(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("cli-coord/{tag}-{}-{nanos}", std::process::id())
}

/// `sh -c SCRIPT` as the command after `--`; the script can call the
/// binary under test as "$ANYKV" and reach the store as "$URL".
fn spawn(url: &str, args: &[&str], script: &str) -> Child {
    let mut cmd = bin();
    cmd.arg("--url")
        .arg(url)
        .args(args)
        .args(["--", "sh", "-c", script])
        .env("ANYKV", env!("CARGO_BIN_EXE_anykv"))
        .env("URL", url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().expect("spawn anykv")
}

/// Runs [`spawn`] to completion: (exit code, stdout, stderr).
fn run_script(url: &str, args: &[&str], script: &str) -> (Option<i32>, String, String) {
    let mut child = spawn(url, args, script);
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let code = wait(&mut child, Duration::from_secs(90));
    (
        code,
        out.join().expect("stdout reader"),
        err.join().expect("stderr reader"),
    )
}

/// Waits (up to 60 s) until `file` exists with content.
fn wait_for_file(file: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(file)
            && !text.is_empty()
        {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            file.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Each line of `r`, as it comes.
fn lines(r: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in std::io::BufReader::new(r).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Backends without sessions refuse the commands that need them.
fn refused(url: &str) {
    let name = fresh("refused");
    let (code, _, err) = run_script(url, &["elect", &name, "--ttl", "5s"], "exit 0");
    assert_eq!(code, Some(2), "elect: {err}");
    assert!(err.contains("unsupported"), "{err}");
    let key = format!("{name}/k");
    let (code, _, err) = run_script(url, &["register", &key, "v"], "exit 0");
    assert_eq!(code, Some(2), "register: {err}");
    assert!(err.contains("unsupported"), "{err}");
    // `leader` only reads: no leader.
    anykv(url, &["leader", &name]).fails(1, "no leader");
}

/// `elect` runs the command with ANYKV_TERM and ANYKV_LEADER_KEY and exits
/// with its code; leadership is deleted from outside → killed, exit 5.
fn elect_basics(url: &str) {
    let name = fresh("basics");
    let (code, out, err) = run_script(
        url,
        &["elect", &name, "--ttl", "5s"],
        r#"echo "$ANYKV_TERM $ANYKV_LEADER_KEY"; exit 7"#,
    );
    assert_eq!(code, Some(7), "{err}");
    let mut words = out.split_whitespace();
    let term: u64 = words
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no term: {out:?}"));
    assert!(term > 0, "{out}");
    let key = words.next().unwrap_or_default();
    assert!(key.starts_with(&format!("{name}/")), "{out}");

    // Deleting the candidate key (an operator's intervention) ends
    // leadership: the command is killed at once and anykv exits 5.
    let started = Instant::now();
    let (code, _, err) = run_script(
        url,
        &["elect", &name, "--ttl", "5s"],
        r#""$ANYKV" --url "$URL" del "$ANYKV_LEADER_KEY" && exec sleep 60"#,
    );
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("leadership lost"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}

/// Cross-process: the second candidate's command runs only after the
/// first's has exited, with a higher term; `leader` shows the leader
/// meanwhile and "no leader" after; `leader --watch --json` sees it all.
fn two_candidates(url: &str) {
    let name = fresh("two");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log");
    let log_s = log.to_str().expect("utf-8").to_owned();
    let go = dir.path().join("go");
    let go_s = go.to_str().expect("utf-8").to_owned();

    let mut watch = bin();
    watch
        .arg("--url")
        .arg(url)
        .args(["leader", &name, "--watch", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut watch = watch.spawn().expect("spawn watch");
    let watch_lines = lines(watch.stdout.take().expect("stdout"));

    // The first leader waits for `go` (bounded), then logs its exit.
    let first_script = format!(
        r#"echo "first $ANYKV_TERM" >> {log_s}; i=0; while [ ! -e {go_s} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; echo "first-end" >> {log_s}"#
    );
    let mut first = spawn(
        url,
        &["elect", &name, "--value", "one", "--ttl", "5s"],
        &first_script,
    );
    let seen = wait_for_file(&log);
    assert!(seen.starts_with("first "), "{seen}");

    // `leader` names the first.
    let line = anykv(url, &["leader", &name]).ok();
    let (value, term) = line.trim_end().split_once('\t').expect("VALUE\\tTERM");
    assert_eq!(value, "one");
    let first_term: u64 = term.parse().expect("term");
    assert_eq!(seen.split_whitespace().nth(1), Some(term), "{seen}");

    // The second candidate queues behind it.
    let second_script = format!(r#"echo "second $ANYKV_TERM" >> {log_s}"#);
    let mut second = spawn(
        url,
        &["elect", &name, "--value", "two", "--ttl", "5s"],
        &second_script,
    );
    thread::sleep(Duration::from_secs(1));
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        !text.contains("second"),
        "the second ran while the first led: {text}"
    );
    std::fs::write(&go, b"").expect("go");
    assert_eq!(wait(&mut first, Duration::from_secs(60)), Some(0));
    assert_eq!(wait(&mut second, Duration::from_secs(60)), Some(0));

    let text = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("first "), "{text}");
    assert_eq!(lines[1], "first-end", "{text}");
    let second_term: u64 = lines[2]
        .strip_prefix("second ")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        second_term > first_term,
        "terms {first_term} then {second_term}"
    );

    // Both resigned: no leader.
    anykv(url, &["leader", &name]).fails(1, "no leader");
    let out = anykv(url, &["leader", &name, "--json"]);
    assert_eq!((out.code, out.text().trim()), (Some(1), "null"));

    // The watch saw: (maybe no leader,) one, two, no leader — in order.
    let expected_tail = [
        format!("one@{first_term}"),
        format!("two@{second_term}"),
        "none".to_owned(),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen: Vec<String> = Vec::new();
    while !seen.ends_with(&expected_tail) && Instant::now() < deadline {
        match watch_lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let v = json(&line);
                seen.push(if v.is_null() {
                    "none".to_owned()
                } else {
                    format!("{}@{}", v["value"].as_str().unwrap_or("?"), v["term"])
                });
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    terminate(&watch);
    assert_eq!(wait(&mut watch, Duration::from_secs(30)), Some(0));
    let mut expected = expected_tail.to_vec();
    if seen.first().map(String::as_str) == Some("none") {
        expected.insert(0, "none".to_owned());
    }
    assert_eq!(seen, expected);
}

/// `register`: the key is visible to another process while the command
/// runs, and gone once it has exited; its exit code passes through.
fn register(url: &str) {
    let key = fresh("reg");
    let (code, out, err) = run_script(
        url,
        &["register", &key, "10.0.0.7:8080", "--ttl", "5s"],
        &format!(r#""$ANYKV" --url "$URL" get {key} && test -n "$ANYKV_SESSION_ID" && exit 3"#),
    );
    assert_eq!(code, Some(3), "{err}");
    assert_eq!(out, "10.0.0.7:8080");
    anykv(url, &["get", &key]).fails(1, "not found");

    // --if-absent refuses an existing key (exit 3), running nothing.
    anykv(url, &["put", &key, "taken"]).ok();
    let (code, out, err) = run_script(url, &["register", &key, "mine", "--if-absent"], "echo ran");
    assert_eq!(code, Some(3), "{err}");
    assert_eq!(out, "");
    assert_eq!(anykv(url, &["get", &key]).stdout, b"taken");
    anykv(url, &["del", &key]).ok();
}

fn server(var: &str, backend: &str) {
    let Some(url) = anykv_testkit::server_url(var) else {
        return;
    };
    if !has_sessions(backend) {
        eprintln!("{backend} declares no sessions: checking that it refuses");
        refused(&url);
        return;
    }
    elect_basics(&url);
    two_candidates(&url);
    register(&url);
}

#[cfg(feature = "etcd")]
#[test]
fn etcd_coordination() {
    server("ANYKV_TEST_ETCD", "etcd");
}

#[cfg(feature = "consul")]
#[test]
fn consul_coordination() {
    server("ANYKV_TEST_CONSUL", "consul");
}

#[cfg(feature = "zookeeper")]
#[test]
fn zookeeper_coordination() {
    server("ANYKV_TEST_ZK", "zookeeper");
}

/// On memory one `anykv` process is the whole store: `elect` leads at
/// once and `register`'s key lives as long as that process.
#[cfg(feature = "memory")]
#[test]
fn memory_coordination() {
    let url = "memory://";
    if !has_sessions("memory") {
        refused(url);
        return;
    }
    let name = fresh("mem");
    let (code, out, err) = run_script(
        url,
        &["elect", &name, "--value", "me"],
        r#"echo "$ANYKV_TERM $ANYKV_LEADER_KEY"; exit 4"#,
    );
    assert_eq!(code, Some(4), "{err}");
    let (term, key) = out.trim().split_once(' ').expect("TERM KEY");
    assert!(term.parse::<u64>().is_ok_and(|t| t > 0), "{out}");
    assert!(key.starts_with(&format!("{name}/")), "{out}");
    let (code, _, err) = run_script(url, &["register", &format!("{name}/k"), "v"], "exit 0");
    assert_eq!(code, Some(0), "{err}");
    anykv(url, &["leader", &name]).fails(1, "no leader");
}

#[test]
fn bad_arguments_are_usage_errors() {
    let (code, _, err) = run_script("memory://", &["elect", "a//b"], "true");
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = run_script("memory://", &["register", "k", "v", "--ttl", "0s"], "true");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--ttl must be positive"), "{err}");
    // No command after `--`.
    let out = anykv("memory://", &["elect", "x"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("COMMAND"), "{out:?}");
}
