//! The command line, declared with clap derive: every command and option,
//! with the help text users read (`anykv --help`, `anykv <command> --help`).

use std::{ffi::OsString, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

/// Store used when neither `--url` nor `ANYKV_URL` says otherwise: a redb
/// file in the current directory, so the tool works with no server.
pub const DEFAULT_URL: &str = "redb://anykv.redb";

/// The exit-code table, shown at the end of `anykv --help` (the README
/// carries the same table).
const EXIT_CODES: &str = "\
Exit codes:
  0    success
  1    not found (`get`/`del` of a missing key, a condition on a missing key),
       `health` found the backend not alive, or any other backend error
  2    usage: bad arguments, invalid key or prefix (the message names the rule
       it broke), invalid or unknown URL scheme or option, value too large,
       operation not supported by this backend, unreadable --file, a dump
       that `restore` refuses (the message names the line)
  3    condition failed: --if-absent on an existing key, --if-version mismatch
  4    backend unreachable: unavailable, timed out, or reports data loss
  5    lock: not acquired within --wait, or lost while the command ran;
       elect: not leader within --wait, or leadership lost while the command
       ran; register: the session was lost while the command ran
  126  lock, elect, register: the command could not be executed
  127  lock, elect, register: the command was not found
  `lock`, `elect` and `register` otherwise exit with the command's own code
  (128+N if it was killed by signal N). `leader` exits 1 when there is no
  leader. `elect` and `register` need a backend with sessions (`anykv
  drivers`); elsewhere they exit 2.

Errors are one line on stderr; data goes to stdout, values raw so they pipe.";

const ABOUT: &str = "One key-value tool for etcd, Consul, ZooKeeper, redb files and memory";

const LONG_ABOUT: &str = "\
One key-value tool for etcd, Consul, ZooKeeper, redb files and memory.

The store is chosen by URL: --url, else the ANYKV_URL environment variable,
else redb://anykv.redb (a file in the current directory, created if missing).
Examples: redb://data/app.redb, redb:///abs/path.redb, memory://,
etcd://127.0.0.1:2379/app, consul://127.0.0.1:8500/app, zk://127.0.0.1:2181/app
(`anykv drivers` lists the drivers of this build: all five unless it was
built without some). Common URL options: ?prefix=NS&timeout=5s&retries=2.

Keys are UTF-8, 1..=1024 bytes, `/`-separated segments, no leading or trailing
`/`, no empty, `.` or `..` segment, no control characters, and not under the
reserved top-level name `__anykv`. A prefix follows the same rules (empty means
the whole namespace) and covers the keys strictly below it: `app` covers
`app/x`, never `apple`.

Note that a memory:// store lives only as long as one `anykv` process.";

/// `anykv [--url URL] <command>`
#[derive(Debug, Parser)]
#[command(
    name = "anykv",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_long_help = EXIT_CODES,
    propagate_version = true
)]
pub struct Cli {
    /// Store URL [default: redb://anykv.redb]
    #[arg(
        long,
        global = true,
        env = "ANYKV_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub url: Option<String>,

    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a key's value to stdout (exit 1 and "not found: KEY" if absent)
    #[command(after_long_help = "\
The value is written as is. When stdout is a terminal and the value does not
end with a newline, one is added so that the prompt starts on its own line;
piped or redirected (`anykv get k > file`, `$(anykv get k)`), the output is
exactly the value's bytes.")]
    Get(GetArgs),
    /// Write a key from an argument, a file or stdin; prints the new version
    #[command(after_long_help = "\
Examples:
  anykv put config/mode fast
  anykv put config/tls.pem --file tls.pem
  printf 'x' | anykv put config/flag -
  v=$(anykv put jobs/1 queued --if-absent) && anykv put jobs/1 running --if-version \"$v\"
  anykv put session/abc alive --ttl 30s")]
    Put(PutArgs),
    /// Delete a key, or every key below a prefix with --prefix
    #[command(visible_alias = "delete")]
    Del(DelArgs),
    /// List keys below a prefix: key, version, value preview (or --json)
    #[command(after_long_help = "\
Output: one line per key, tab-separated: KEY, VERSION, VALUE PREVIEW. The
preview is the value escaped (\\\\, \\n, \\r, \\t, \\u{..} for other control
characters, \\xNN for bytes that are not UTF-8) and cut to 60 characters.

--json prints one JSON array of objects {key, version, create_revision,
mod_revision, value | value_hex}: `value` is the exact value as a JSON string
when it is valid UTF-8; otherwise `value` is absent and `value_hex` holds the
bytes as lowercase hex. Exactly one of the two is present, so the encoding is
lossless and needs no base64.")]
    List(ListArgs),
    /// Print the names one level below a prefix, one per line
    Keys(KeysArgs),
    /// Print one line per change of a key or prefix until Ctrl-C
    #[command(after_long_help = "\
Output: one line per event, tab-separated:
  put     KEY  REVISION  VALUE (escaped as in `list`, not cut)
  delete  KEY  REVISION
--json prints one JSON object per line: {type: \"put\", key, revision, version,
value | value_hex} or {type: \"delete\", key, revision}.

Ctrl-C (or SIGTERM) ends the watch with exit code 0; a watch error (the
backend went away, the revision asked for is compacted) ends it with the
error's exit code.")]
    Watch(WatchArgs),
    /// Run a command while holding a lock; it sees the fencing token in ANYKV_FENCING_TOKEN
    #[command(after_long_help = "\
The lock is taken (waiting up to --wait, forever by default), then COMMAND
runs with ANYKV_FENCING_TOKEN set to the lock's fencing token, which grows
with every new holder of the key: hand it to the resource you protect so it
can refuse writes from an older holder. anykv renews the lease while the
command runs, releases the lock when it exits and exits with its code.

If the lock is lost while the command runs (lease expired, session lost),
the command is killed (SIGKILL) and anykv exits 5. When stdin is not a
terminal (scripts, cron, systemd) the command runs in its own process group:
losing the lock kills everything it started, and Ctrl-C or SIGTERM sent to
anykv is forwarded to the group. When stdin is a terminal the command stays
in the terminal's foreground group (it can read the terminal, Ctrl-C reaches
it directly, SIGTERM is forwarded) and only the command itself is killed on
loss. Either way the lock is held until the command has exited.

redb and memory locks exclude holders within one process only; a redb file
is moreover held open by the `anykv lock` process, so the command cannot
open the same file itself.

Example:
  anykv --url etcd://127.0.0.1:2379/app lock jobs/nightly --wait 1m -- ./nightly.sh")]
    Lock(LockArgs),
    /// Probe the backend and print its liveness (exit 1 if not alive)
    Health,
    /// List the drivers linked into this build, with URL schemes and capabilities
    Drivers(DriversArgs),
    /// Copy every key (or those below --prefix) from one store to another
    #[command(after_long_help = "\
Keys keep their names (relative to each URL's namespace) and values; TTLs
and versions are not carried. Existing keys of the destination are
overwritten. A progress line is drawn on stderr when it is a terminal; the
number of keys copied is printed to stdout.

Example:
  anykv copy redb://backup.redb etcd://127.0.0.1:2379/app --prefix config")]
    Copy(CopyArgs),
    /// Run a command while this process leads an election; it sees the term in ANYKV_TERM
    #[command(after_long_help = ELECT_HELP)]
    Elect(ElectArgs),
    /// Print an election's leader (value and term), or follow it with --watch
    #[command(after_long_help = LEADER_HELP)]
    Leader(LeaderArgs),
    /// Keep an ephemeral key while a command runs (service registration, presence)
    #[command(after_long_help = REGISTER_HELP)]
    Register(RegisterArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    #[command(after_long_help = COMPLETIONS_HELP)]
    Completions(CompletionsArgs),
    /// Write every key (or those below --prefix) as JSON lines, at one revision where the backend can
    #[command(after_long_help = DUMP_HELP)]
    Dump(DumpArgs),
    /// Write the keys of a dump file back (checks the whole file first)
    #[command(after_long_help = RESTORE_HELP)]
    Restore(RestoreArgs),
}

const ELECT_HELP: &str = "\
Joins the election NAME as a candidate with --value (default: anykv pid N)
and waits for its turn: candidates lead in the order they joined. Once this
process leads, COMMAND runs with ANYKV_TERM set to the leader's term (it
grows with every new leader of NAME: hand it to what you protect so it can
refuse an older leader) and ANYKV_LEADER_KEY to this candidate's key. The
candidate's session is renewed in the background from the moment it joins,
waiting included; if the process dies or freezes, leadership passes to the
next candidate about --ttl later.

When COMMAND exits, anykv resigns and exits with its code. If leadership is
lost while it runs (session expired or lost), COMMAND is killed (SIGKILL)
and anykv exits 5. --wait gives up (exit 5) if this process is not leading
by then. Signals, process groups and terminals are handled as by `anykv
lock` (see `anykv lock --help`).

Needs a backend with sessions (`anykv drivers`): across processes on etcd,
Consul and ZooKeeper; within one process on redb and memory.

Example:
  anykv --url etcd://127.0.0.1:2379/app elect scheduler --value \"$(hostname)\" -- ./scheduler";

const LEADER_HELP: &str = "\
Output: VALUE<TAB>TERM (the value escaped as in `list`, not cut), or exit 1
with \"no leader: NAME\" on stderr. --json prints {term, key, value |
value_hex} (encoded as in `list --json`), or null (exit 1).

--watch prints the leader at once, then one line per change (a new leader,
a new value, no leader: the line `no leader` or null), until Ctrl-C or
SIGTERM (exit 0).

Example:
  anykv --url etcd://127.0.0.1:2379/app leader scheduler --watch";

const REGISTER_HELP: &str = "\
Opens a session (renewed in the background, with --ttl), writes KEY = VALUE
under it, and runs COMMAND with ANYKV_SESSION_ID set. The key is an ordinary
key for everyone else (get, list, watch see it) but ephemeral: it is
deleted when COMMAND exits (anykv closes the session and exits with its
code), and also when anykv dies or freezes, about --ttl later.
--if-absent refuses (exit 3) a key that already exists: a reservation.

If the session is lost while COMMAND runs, COMMAND is killed (SIGKILL) and
anykv exits 5. Signals and process groups are handled as by `anykv lock`.
Needs a backend with sessions (`anykv drivers`).

Example:
  anykv --url zk://127.0.0.1:2181/app register instances/$(hostname) 10.0.0.7:8080 -- ./server";

const COMPLETIONS_HELP: &str = "\
Prints the script to stdout. To install it:
  bash: anykv completions bash > ~/.local/share/bash-completion/completions/anykv
  zsh:  anykv completions zsh > \"${fpath[1]}/_anykv\"   (a directory in $fpath)
  fish: anykv completions fish > ~/.config/fish/completions/anykv.fish";

const DUMP_HELP: &str = "\
Output (stdout, or --file): JSON lines. The first is a header:
  {\"format\":\"anykv-dump\",\"version\":1,\"backend\":\"etcd\",\"revision\":42,
   \"consistent\":true,\"snapshot\":\"atomic\",\"prefix\":\"config\",\"created\":\"<RFC 3339>\"}
then one line per key, sorted, {\"key\", \"value\" | \"value_hex\"} with the value
encoded as in `list --json` (text when UTF-8, else hex: lossless), and last
an end line {\"end\":true,\"count\":N} without which `restore` refuses the file
as incomplete. Keys are relative to --prefix (config/a is written \"a\").

The keys are read at one store revision (the header's \"revision\") on
backends with a snapshot (`anykv drivers` says which). Elsewhere they are
streamed one by one: the header then has \"consistent\":false,
\"revision\":null and a \"note\", and writes made during the dump may show
partly. A \"verified\" snapshot (ZooKeeper: read twice, kept only if nothing
changed) may fail with exit 4 under constant writes: run it again. TTLs and
versions are not dumped. A snapshot is held in memory while it is written.
--file FILE is replaced only once the dump is complete (it is written under
a temporary name beside it, then renamed), readable by its owner only.

Examples:
  anykv --url etcd://127.0.0.1:2379/app dump > app.jsonl
  anykv dump --prefix config --file config.jsonl";

const RESTORE_HELP: &str = "\
Reads a dump written by `anykv dump` from stdin, or --file. The whole file
is checked first: header (format and version), every line's JSON, keys valid
under the target prefix, values decodable (value_hex is hex), no key twice,
the end line's count, and the largest value against this backend's limit.
A bad file is refused with its line number and exit 2, and nothing is
written. A dump piped in is spooled to a temp file for the check; a file
(--file or `< FILE`) is read twice in place.

Keys go under the dump's own prefix, or under --prefix P instead (`''`:
the top of the namespace). Keys that exist are overwritten; other keys
below the prefix stay unless --clean deletes them first. Writes go in
atomic batches within the backend's limits; the restore as a whole is not
atomic (after a failure, the batches written stay and the error says how
many pairs; running it again converges). Prints the number of pairs restored.

Examples:
  anykv --url redb://copy.redb restore < app.jsonl
  anykv restore --file config.jsonl --prefix config-old
  anykv dump --prefix app | anykv --url etcd://127.0.0.1:2379 restore --clean";

/// `anykv get`
#[derive(Debug, Args)]
pub struct GetArgs {
    /// The key
    pub key: String,
    /// Print {key, version, create_revision, mod_revision, value | value_hex} as JSON
    #[arg(long)]
    pub json: bool,
}

/// `anykv put`
#[derive(Debug, Args)]
pub struct PutArgs {
    /// The key
    pub key: String,
    /// The value; `-` reads it from stdin (use `--` before a value starting with `-`)
    #[arg(
        required_unless_present = "file",
        conflicts_with = "file",
        value_parser = clap::value_parser!(OsString)
    )]
    pub value: Option<OsString>,
    /// Read the value from FILE
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// The key disappears after this long (e.g. 30s, 5m, 1h 30m)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Only create: fail with exit 3 if the key exists
    #[arg(long, conflicts_with_all = ["if_present", "if_version"])]
    pub if_absent: bool,
    /// Only update: fail with exit 1 if the key does not exist
    #[arg(long, conflicts_with = "if_version")]
    pub if_present: bool,
    /// Compare-and-swap: write only if the key is at VERSION (exit 3 otherwise)
    #[arg(long, value_name = "VERSION")]
    pub if_version: Option<u64>,
}

/// `anykv del`
#[derive(Debug, Args)]
pub struct DelArgs {
    /// The key (with --prefix: the prefix)
    #[arg(required_unless_present = "all")]
    pub key: Option<String>,
    /// Delete every key strictly below KEY instead (prints how many)
    #[arg(long, conflicts_with = "if_version")]
    pub prefix: bool,
    /// Delete every key of the store's namespace (prints how many)
    #[arg(long, conflicts_with_all = ["key", "prefix", "if_version"])]
    pub all: bool,
    /// Delete only if the key is at VERSION (exit 3 otherwise)
    #[arg(long, value_name = "VERSION")]
    pub if_version: Option<u64>,
}

/// `anykv list`
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The prefix (default: the whole namespace)
    #[arg(default_value = "")]
    pub prefix: String,
    /// Print a JSON array (see below for the value encoding)
    #[arg(long)]
    pub json: bool,
}

/// `anykv keys`
#[derive(Debug, Args)]
pub struct KeysArgs {
    /// The prefix (default: the top level of the namespace)
    #[arg(default_value = "")]
    pub prefix: String,
}

/// `anykv watch`
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The key to watch
    #[arg(required_unless_present = "prefix", conflicts_with = "prefix")]
    pub key: Option<String>,
    /// Watch every key strictly below this prefix instead (`''`: everything)
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// Replay past events from revision REV on (inclusive, like `etcdctl watch --rev`)
    #[arg(long, value_name = "REV")]
    pub from: Option<u64>,
    /// Print one JSON object per line
    #[arg(long)]
    pub json: bool,
}

/// `anykv lock`
#[derive(Debug, Args)]
pub struct LockArgs {
    /// The lock's key
    pub key: String,
    /// Lease length: if anykv dies, the lock frees itself after this
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Give up (exit 5) if the lock is not free within this long; 0s: try once
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub wait: Option<Duration>,
    /// Holder name shown to others (default: anykv pid N)
    #[arg(long, value_name = "NAME")]
    pub owner: Option<String>,
    #[command(flatten)]
    pub child: ChildArgs,
}

/// The command `lock`, `elect` and `register` run, after `--`.
#[derive(Debug, Args)]
pub struct ChildArgs {
    /// The command and its arguments, after `--`
    #[arg(
        last = true,
        required = true,
        num_args = 1..,
        value_name = "COMMAND",
        value_parser = clap::value_parser!(OsString)
    )]
    pub command: Vec<OsString>,
}

/// `anykv elect`
#[derive(Debug, Args)]
pub struct ElectArgs {
    /// The election's name (candidates are keys one level below it)
    pub name: String,
    /// The value this process leads with, shown by `anykv leader` (default: anykv pid N)
    #[arg(long, value_name = "VALUE")]
    pub value: Option<String>,
    /// Session TTL: if anykv dies or freezes, leadership passes on after this
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Give up (exit 5) if not leading within this long (default: wait forever)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub wait: Option<Duration>,
    #[command(flatten)]
    pub child: ChildArgs,
}

/// `anykv leader`
#[derive(Debug, Args)]
pub struct LeaderArgs {
    /// The election's name
    pub name: String,
    /// Print every change until Ctrl-C
    #[arg(long)]
    pub watch: bool,
    /// Print JSON: {term, key, value | value_hex}, or null
    #[arg(long)]
    pub json: bool,
}

/// `anykv register`
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// The ephemeral key
    pub key: String,
    /// Its value
    pub value: String,
    /// Session TTL: if anykv dies or freezes, the key goes after this
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Fail with exit 3 if the key exists
    #[arg(long)]
    pub if_absent: bool,
    #[command(flatten)]
    pub child: ChildArgs,
}

/// `anykv completions`
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `anykv drivers`
#[derive(Debug, Args)]
pub struct DriversArgs {
    /// Print a JSON array
    #[arg(long)]
    pub json: bool,
}

/// `anykv copy`
#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Source store URL
    #[arg(value_name = "SRC_URL")]
    pub src: String,
    /// Destination store URL
    #[arg(value_name = "DST_URL")]
    pub dst: String,
    /// Copy only the keys strictly below this prefix
    #[arg(long, value_name = "PREFIX", default_value = "")]
    pub prefix: String,
}

/// `anykv dump`
#[derive(Debug, Args)]
pub struct DumpArgs {
    /// Dump only the keys strictly below this prefix
    #[arg(long, value_name = "PREFIX", default_value = "")]
    pub prefix: String,
    /// Write to FILE instead of stdout
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: Option<PathBuf>,
}

/// `anykv restore`
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Restore below this prefix instead of the dump's own (`''`: the top)
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// Read the dump from FILE instead of stdin
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Delete every key below the target prefix first (after the check)
    #[arg(long)]
    pub clean: bool,
}

/// Parses `30s`, `5m`, `1h 30m`, `250ms` (humantime).
fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 30s, 5m, 250ms)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
