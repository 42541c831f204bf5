//! Error paths and one-shot commands against `memory://`. Each `anykv`
//! process has its own memory store, so nothing here spans invocations.

#![cfg(feature = "memory")]

mod common;

use common::{anykv, bin, run};

const MEM: &str = "memory://";

#[test]
fn missing_key_is_exit_1_not_found() {
    anykv(MEM, &["get", "config/absent"]).fails(1, "not found: config/absent");
    anykv(MEM, &["del", "config/absent"]).fails(1, "not found: config/absent");
    // A condition on an absent key is "not found" too.
    anykv(MEM, &["put", "k", "v", "--if-version", "3"]).fails(1, "not found: k");
    anykv(MEM, &["put", "k", "v", "--if-present"]).fails(1, "not found: k");
}

#[test]
fn bad_keys_are_exit_2_with_the_rule() {
    let cases: &[(&[&str], &str)] = &[
        (&["get", "a//b"], "must not contain an empty segment"),
        (&["get", "/a"], "must not start with '/'"),
        (&["put", "a/", "v"], "must not end with '/'"),
        (&["put", "a/../b", "v"], "'.' or '..' segment"),
        (&["del", "__anykv/locks"], "is reserved"),
        (&["list", "a//"], "must not"),
        (&["keys", "x/./y"], "'.' or '..' segment"),
        (&["watch", "a\tb"], "control character"),
        (&["watch", "--prefix", "/p"], "must not start with '/'"),
        (&["lock", "/l", "--", "true"], "must not start with '/'"),
    ];
    for (args, rule) in cases {
        anykv(MEM, args).fails(2, rule);
    }
    let long = "k".repeat(1025);
    anykv(MEM, &["get", &long]).fails(2, "longer than 1024");
}

#[test]
fn bad_keys_fail_before_connecting() {
    // The URL points nowhere reachable; the key is rejected first.
    anykv("nosuch://x", &["get", "a//b"]).fails(2, "invalid key");
}

#[test]
fn unknown_scheme_lists_the_linked_drivers() {
    let out = anykv("nosuch://x", &["get", "a"]);
    out.fails(2, "unknown backend \"nosuch\"");
    assert!(out.stderr.contains("memory"), "{out:?}");
    if cfg!(feature = "redb") {
        assert!(out.stderr.contains("redb"), "{out:?}");
    }
}

#[test]
fn url_errors_are_exit_2() {
    anykv("no-scheme", &["get", "a"]).fails(2, "invalid url");
    anykv("memory://?bogus=1", &["get", "a"]).fails(2, "unknown option \"bogus\"");
    anykv("memory://?timeout=soon", &["get", "a"]).fails(2, "timeout");
}

#[test]
fn usage_errors_are_exit_2() {
    for args in [
        &["put", "k"][..],
        &["put", "k", "v", "--if-absent", "--if-version", "1"],
        &["put", "k", "v", "--ttl", "soon"],
        &["del"],
        &["watch"],
        &["watch", "k", "--prefix", "p"],
        &["lock", "k"],
        &["frobnicate"],
    ] {
        let out = anykv(MEM, args);
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        assert!(!out.stderr.contains("panicked"), "{out:?}");
    }
    anykv(MEM, &["put", "k", "v", "--ttl", "0s"]).fails(2, "--ttl must be positive");
    anykv(MEM, &["put", "k", "--file", "/nonexistent/value"])
        .fails(2, "cannot read /nonexistent/value");
    anykv(MEM, &["del", "--prefix", ""]).fails(2, "use `del --all`");
    anykv(MEM, &["copy", "memory://", "memory://"]).fails(2, "same store");
}

#[test]
fn put_prints_a_version_and_conditions_map_to_exit_3() {
    let version = anykv(MEM, &["put", "k", "v"]).ok();
    assert!(version.trim().parse::<u64>().is_ok(), "{version:?}");
    // --if-absent on a fresh store succeeds.
    anykv(MEM, &["put", "k", "v", "--if-absent"]).ok();
}

#[test]
fn value_too_large_is_exit_2() {
    // memory's limit is 16 MiB; send one byte more on stdin.
    let big = vec![b'x'; (16 << 20) + 1];
    common::anykv_stdin(MEM, &["put", "big", "-"], &big).fails(2, "over the limit");
}

#[test]
fn empty_store_lists_nothing() {
    assert_eq!(anykv(MEM, &["list"]).ok(), "");
    assert_eq!(anykv(MEM, &["list", "--json"]).ok(), "[]\n");
    assert_eq!(anykv(MEM, &["keys", "app"]).ok(), "");
    assert_eq!(anykv(MEM, &["del", "--all"]).ok(), "0\n");
    assert_eq!(anykv(MEM, &["del", "app", "--prefix"]).ok(), "0\n");
}

#[test]
fn lock_runs_the_command_with_the_token_and_its_exit_code() {
    let out = anykv(
        MEM,
        &[
            "lock",
            "jobs/nightly",
            "--",
            "sh",
            "-c",
            "echo token=$ANYKV_FENCING_TOKEN; exit 7",
        ],
    );
    assert_eq!(out.code, Some(7), "{out:?}");
    let text = out.text();
    let token = text.trim().strip_prefix("token=").expect("token line");
    assert!(token.parse::<u64>().is_ok(), "{text:?}");

    assert_eq!(
        anykv(MEM, &["lock", "l", "--wait", "0s", "--", "true"]).code,
        Some(0)
    );
    anykv(MEM, &["lock", "l", "--", "/nonexistent/cmd"]).fails(127, "command not found");
    let out = anykv(MEM, &["lock", "l", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.code, Some(137), "{out:?}");
}

#[test]
fn health_reports_alive() {
    let text = anykv(MEM, &["health"]).ok();
    assert!(text.contains("backend:   memory"), "{text}");
    assert!(text.contains("alive:     yes"), "{text}");
}

#[test]
fn drivers_lists_every_enabled_driver() {
    let text = anykv(MEM, &["drivers"]).ok();
    assert!(text.contains("memory://"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&anykv(MEM, &["drivers", "--json"]).ok()).expect("json");
    let names: Vec<&str> = json
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    for (enabled, name) in [
        (cfg!(feature = "memory"), "memory"),
        (cfg!(feature = "redb"), "redb"),
        (cfg!(feature = "etcd"), "etcd"),
        (cfg!(feature = "consul"), "consul"),
        (cfg!(feature = "zookeeper"), "zookeeper"),
    ] {
        assert_eq!(names.contains(&name), enabled, "{name}: {names:?}");
    }
    let memory = json
        .as_array()
        .and_then(|all| all.iter().find(|d| d["name"] == "memory"))
        .expect("memory driver");
    assert_eq!(memory["schemes"][0], "memory");
    assert_eq!(memory["capabilities"]["locks"], true);
    assert_eq!(memory["capabilities"]["durable"], false);
}

#[test]
fn every_command_has_help() {
    for cmd in [
        "get",
        "put",
        "del",
        "list",
        "keys",
        "watch",
        "lock",
        "health",
        "drivers",
        "copy",
        "dump",
        "restore",
        "elect",
        "leader",
        "register",
        "completions",
    ] {
        let mut c = bin();
        c.args([cmd, "--help"]);
        let text = run(c, None).ok();
        assert!(text.contains("Usage: anykv"), "{cmd}: {text}");
    }
    let mut c = bin();
    c.arg("--help");
    let text = run(c, None).ok();
    assert!(text.contains("Exit codes:"), "{text}");
    assert!(text.contains("ANYKV_URL"), "{text}");
}

#[test]
fn url_from_env_is_not_shown_in_help() {
    let mut c = bin();
    c.env("ANYKV_URL", "etcd://user:hunter2@127.0.0.1:1")
        .arg("--help");
    let text = run(c, None).ok();
    assert!(!text.contains("hunter2"), "{text}");
}

#[test]
fn url_from_env_is_used() {
    let mut c = bin();
    c.env("ANYKV_URL", "nosuch://x").args(["get", "a"]);
    run(c, None).fails(2, "unknown backend \"nosuch\"");
    // --url wins over the environment.
    let mut c = bin();
    c.env("ANYKV_URL", "nosuch://x")
        .args(["--url", MEM, "get", "a"]);
    run(c, None).fails(1, "not found: a");
}

#[test]
fn closed_stdout_is_not_an_error() {
    // `anykv drivers | true`: stdout closed before anything is written.
    let mut child = bin()
        .args(["drivers"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let code = common::wait(&mut child, common::DEADLINE);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err).ok();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.is_empty(), "{err}");
}

/// Runs `lock` with a script that traps `signal_name`, sends `kill_arg` to
/// anykv, and checks the script saw it and its exit code came back.
fn lock_forwards(kill_arg: &str, signal_name: &str) {
    use std::io::{BufRead, BufReader};
    let script = format!(
        "trap 'echo got-{signal_name}; exit 3' {signal_name}; echo ready; while :; do sleep 0.05; done"
    );
    // stdin is not a terminal: the command runs in its own process group.
    let mut child = bin()
        .args(["--url", MEM, "lock", "l", "--", "sh", "-c", &script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("line").expect("read"), "ready");
    let status = std::process::Command::new("kill")
        .args([kill_arg, &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    assert_eq!(
        lines.next().expect("line").expect("read"),
        format!("got-{signal_name}")
    );
    // anykv released the lock and exited with the command's code.
    assert_eq!(common::wait(&mut child, common::DEADLINE), Some(3));
}

#[test]
fn lock_forwards_sigterm_to_the_command() {
    lock_forwards("-TERM", "TERM");
}

#[test]
fn lock_forwards_ctrl_c_to_a_command_in_its_own_group() {
    lock_forwards("-INT", "INT");
}

#[test]
fn completions_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F _anykv"),
        ("zsh", "#compdef anykv"),
        ("fish", "complete -c anykv"),
    ] {
        let text = anykv(MEM, &["completions", shell]).ok();
        assert!(text.contains(marker), "{shell}: {text}");
        // Every command is offered.
        for cmd in ["get", "elect", "leader", "register", "dump", "completions"] {
            assert!(text.contains(cmd), "{shell} lacks {cmd}");
        }
    }
    let out = anykv(MEM, &["completions", "tcsh"]);
    assert_eq!(out.code, Some(2), "{out:?}");
}
