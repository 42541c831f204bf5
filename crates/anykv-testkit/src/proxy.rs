//! An in-process TCP fault proxy: the network between loopback servers,
//! with faults switched on and off at run time.
//!
//! The fault suite runs every server on 127.0.0.1. To cut, slow or reset the
//! path to one member it puts a [`Proxy`] in front of each port the member
//! listens on (client port and peer/quorum port), configures the servers to
//! advertise and dial the proxy's port, and flips the proxy's [`Mode`] while
//! the workload runs. A new mode applies at once to new **and** existing
//! connections.
//!
//! All processes share 127.0.0.1, so a proxy cannot tell members apart by
//! address. It tells them apart by process instead: on accept it looks up
//! which process owns the client end of the connection ([`origin_pid`],
//! through `/proc`), so [`Proxy::block_origin`] can black-hole only the
//! traffic coming from one member. Partitioning member X is then:
//! black-hole X's own proxies, and `block_origin(X's pid)` on every other
//! member's proxies.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use anykv_testkit::proxy::{Mode, Proxy};
//!
//! # async fn example(member_port: std::net::SocketAddr) -> anyhow::Result<()> {
//! // The member listens on `member_port`; it is configured to advertise the
//! // proxy's address instead.
//! let proxy = Proxy::start("127.0.0.1:0".parse()?, member_port).await?;
//! let advertised = proxy.local_addr();
//! # let _ = advertised;
//! proxy.set_mode(Mode::Delay(Duration::from_millis(200))); // a slow link
//! proxy.set_mode(Mode::Blackhole); // a partition: bytes are held
//! proxy.set_mode(Mode::Pass); // healed: held bytes are delivered
//! println!("{:?}", proxy.stats());
//! drop(proxy); // closes the listener and every connection
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, warn};

/// Largest chunk read from one side before it is forwarded to the other.
const CHUNK: usize = 64 * 1024;
/// Chunks read but not yet delivered, per direction. Bounds what a delayed
/// direction holds in memory; beyond it the sender's TCP window fills, as on
/// a slow real link.
const QUEUE_CHUNKS: usize = 16;
/// Pause after a failed `accept` (e.g. out of file descriptors), so a
/// persistent error does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What a [`Proxy`] does with traffic. Set with [`Proxy::set_mode`]; applies
/// to new and existing connections at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Forward both ways as fast as the sockets allow.
    #[default]
    Pass,
    /// Forward both ways, each byte delivered this long after the proxy read
    /// it (so a round trip through the proxy takes at least twice this).
    /// Chunks are pipelined: the delay adds latency, it does not serialise
    /// the stream, up to 16 × 64 KiB in flight per direction.
    Delay(Duration),
    /// A network partition. Nothing is delivered either way; bytes already
    /// read are held, and the proxy stops reading, so further bytes wait in
    /// the kernel's buffers and the sender's window fills. When the mode
    /// changes back, everything held is delivered in order — as TCP
    /// retransmission would deliver it once a real partition heals. New
    /// connections are accepted (the kernel completes the handshake) but
    /// held too: the proxy dials the upstream only after the partition heals.
    ///
    /// Unlike a real lost path, the sender's kernel still gets ACKs until the
    /// proxy's receive buffer fills, so TCP-level timeouts
    /// (`TCP_USER_TIMEOUT`) do not fire; application heartbeats and request
    /// deadlines — what etcd, ZooKeeper and Consul rely on — see the outage.
    Blackhole,
    /// A dead peer: existing connections are closed with a TCP RST (both
    /// ends: client and upstream), and new ones are accepted then reset at
    /// once. Bytes held by the proxy are lost, as with a real reset.
    Reset,
}

/// Counters of a [`Proxy`] since it started. See [`Proxy::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Connections accepted on the listening port.
    pub accepted: u64,
    /// Connections open now (accepted and not yet closed).
    pub active: u64,
    /// Bytes delivered from clients to the upstream.
    pub bytes_to_upstream: u64,
    /// Bytes delivered from the upstream to clients.
    pub bytes_to_client: u64,
    /// New connections reset at once: accepted in [`Mode::Reset`], or the
    /// upstream refused the proxy's connection (a killed member).
    pub refused: u64,
    /// Established connections closed with a RST by [`Mode::Reset`].
    pub reset: u64,
}

/// A TCP proxy from a loopback port to one upstream address, with switchable
/// faults. Runs on the current tokio runtime; dropping it closes the listener
/// and every connection (see also [`Proxy::stop`]).
///
/// ```no_run
/// use anykv_testkit::proxy::{Mode, Proxy};
///
/// # async fn example(peer_port_of_x: std::net::SocketAddr, x_pid: u32, y_proxy: &Proxy) -> anyhow::Result<()> {
/// // Partition member X from member Y: X's own proxy goes silent, and Y's
/// // proxy drops whatever X's process sends to Y.
/// let x_proxy = Proxy::start("127.0.0.1:0".parse()?, peer_port_of_x).await?;
/// x_proxy.set_mode(Mode::Blackhole);
/// y_proxy.block_origin(x_pid);
/// // ... heal:
/// x_proxy.set_mode(Mode::Pass);
/// y_proxy.unblock_origin(x_pid);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Proxy {
    local: SocketAddr,
    upstream: SocketAddr,
    /// The mode and blocked origins. Every connection watches it, so a
    /// change reaches existing connections at once; dropping it (with the
    /// proxy) tells the accept loop to close everything.
    control: watch::Sender<Control>,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on `listen` (a loopback address; port 0 picks a free one) and
    /// forwards each accepted connection to `upstream`, in [`Mode::Pass`].
    ///
    /// The upstream is dialled per accepted connection, so it may be down
    /// when the proxy starts, and may be restarted behind a running proxy.
    /// Must be called inside a tokio runtime.
    ///
    /// ```no_run
    /// # async fn example() -> anyhow::Result<()> {
    /// let proxy = anykv_testkit::proxy::Proxy::start(
    ///     "127.0.0.1:0".parse()?,
    ///     "127.0.0.1:2379".parse()?,
    /// ).await?;
    /// println!("dial {} to reach 127.0.0.1:2379", proxy.local_addr());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("fault proxy: cannot listen on {listen}"))?;
        let local = listener.local_addr()?;
        let (control, watching) = watch::channel(Control::default());
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(accept_loop(listener, upstream, watching, counters.clone()));
        debug!(%local, %upstream, "fault proxy started");
        Ok(Proxy {
            local,
            upstream,
            control,
            counters,
            task,
        })
    }

    /// The address the proxy listens on: what servers and clients dial.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The address the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Switches the proxy to `mode`, for new and existing connections at once.
    ///
    /// ```no_run
    /// # fn example(proxy: &anykv_testkit::proxy::Proxy) {
    /// use anykv_testkit::proxy::Mode;
    /// proxy.set_mode(Mode::Reset);
    /// assert_eq!(proxy.mode(), Mode::Reset);
    /// # }
    /// ```
    pub fn set_mode(&self, mode: Mode) {
        debug!(local = %self.local, ?mode, "fault proxy mode");
        self.control.send_modify(|control| control.mode = mode);
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.control.borrow().mode
    }

    /// Black-holes, as [`Mode::Blackhole`] does, every connection whose client
    /// end belongs to process `pid`, existing and new, whatever the mode
    /// (except [`Mode::Reset`], which still resets them). Connections whose
    /// origin could not be found are not affected.
    ///
    /// ```no_run
    /// # fn example(proxy: &anykv_testkit::proxy::Proxy, member_pid: u32) {
    /// proxy.block_origin(member_pid); // member_pid can no longer reach this port
    /// proxy.unblock_origin(member_pid); // held bytes are delivered
    /// # }
    /// ```
    pub fn block_origin(&self, pid: u32) {
        debug!(local = %self.local, pid, "fault proxy blocks origin");
        self.control.send_modify(|control| {
            control.blocked.insert(pid);
        });
    }

    /// Undoes [`Proxy::block_origin`]: traffic held from `pid` is delivered.
    pub fn unblock_origin(&self, pid: u32) {
        debug!(local = %self.local, pid, "fault proxy unblocks origin");
        self.control.send_modify(|control| {
            control.blocked.remove(&pid);
        });
    }

    /// Counters since the proxy started.
    ///
    /// ```no_run
    /// # fn example(proxy: &anykv_testkit::proxy::Proxy) {
    /// let stats = proxy.stats();
    /// println!("{} connections, {} bytes up", stats.accepted, stats.bytes_to_upstream);
    /// # }
    /// ```
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            accepted: c.accepted.load(Relaxed),
            active: c.active.load(Relaxed),
            bytes_to_upstream: c.to_upstream.load(Relaxed),
            bytes_to_client: c.to_client.load(Relaxed),
            refused: c.refused.load(Relaxed),
            reset: c.reset.load(Relaxed),
        }
    }

    /// Stops the proxy like dropping it does, and waits until the listener
    /// and every connection are closed, so the port can be bound again at
    /// once (a dropped proxy closes them moments later, on the runtime).
    ///
    /// ```no_run
    /// # async fn example(proxy: anykv_testkit::proxy::Proxy) -> anyhow::Result<()> {
    /// let addr = proxy.local_addr();
    /// proxy.stop().await;
    /// let _again = tokio::net::TcpListener::bind(addr).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn stop(self) {
        let Proxy { control, task, .. } = self;
        drop(control);
        if let Err(e) = task.await {
            warn!("fault proxy accept loop ended abnormally: {e}");
        }
    }
}

/// What every connection watches: the proxy's mode and blocked origins.
#[derive(Debug, Clone, Default)]
struct Control {
    mode: Mode,
    blocked: BTreeSet<u32>,
}

impl Control {
    /// The mode for a connection from `origin`: a reset resets everyone, and
    /// a blocked origin is black-holed whatever else is set.
    fn mode_for(&self, origin: Option<u32>) -> Mode {
        match (self.mode, origin) {
            (Mode::Reset, _) => Mode::Reset,
            (_, Some(pid)) if self.blocked.contains(&pid) => Mode::Blackhole,
            (mode, _) => mode,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    active: AtomicU64,
    to_upstream: AtomicU64,
    to_client: AtomicU64,
    refused: AtomicU64,
    reset: AtomicU64,
}

/// Counts a connection as active for as long as it lives, even if its task
/// is aborted.
struct Active(Arc<Counters>);

impl Active {
    fn new(counters: Arc<Counters>) -> Active {
        counters.active.fetch_add(1, Relaxed);
        Active(counters)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

/// Accepts connections until the proxy is dropped, then aborts and awaits
/// every connection task, so all sockets are closed when it returns.
async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mut control: watch::Receiver<Control>,
    counters: Arc<Counters>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    counters.accepted.fetch_add(1, Relaxed);
                    connections.spawn(serve(client, peer, upstream, control.clone(), counters.clone()));
                }
                Err(e) => {
                    warn!("fault proxy: accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            changed = control.changed() => if changed.is_err() {
                break; // the Proxy was dropped
            },
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// How a forwarded connection ended.
enum Ending {
    /// Both directions reached EOF and were shut down in turn.
    Closed,
    /// One side failed (e.g. reset by its peer): the other side gets a reset
    /// too, as it would through a real network.
    Failed(io::Error),
    /// [`Mode::Reset`] was set.
    Reset,
    /// The proxy was dropped.
    Stopped,
}

/// Serves one accepted connection: finds its origin, waits out a partition,
/// dials the upstream and forwards both ways until the connection ends.
async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    upstream: SocketAddr,
    mut control: watch::Receiver<Control>,
    counters: Arc<Counters>,
) {
    let _active = Active::new(counters.clone());
    // Reading /proc is blocking file I/O, and the client end must be looked
    // up while it still exists: now, once.
    let origin = match client.local_addr() {
        Ok(local) => tokio::task::spawn_blocking(move || origin_pid(peer, local))
            .await
            .ok()
            .flatten(),
        Err(_) => None,
    };
    debug!(%peer, ?origin, "fault proxy accepted");

    // A connection made during a partition is held, not refused, as a SYN
    // would be retransmitted until the path heals.
    let Ok(mode) = mode_when(&mut control, origin, |m| m != Mode::Blackhole).await else {
        return;
    };
    if mode == Mode::Reset {
        counters.refused.fetch_add(1, Relaxed);
        reset(&client);
        return;
    }
    let dialled = tokio::select! {
        dialled = TcpStream::connect(upstream) => dialled,
        reset_or_stopped = mode_when(&mut control, origin, |m| m == Mode::Reset) => {
            if reset_or_stopped.is_ok() {
                counters.refused.fetch_add(1, Relaxed);
                reset(&client);
            }
            return;
        }
    };
    let mut server = match dialled {
        Ok(server) => server,
        Err(e) => {
            // The member is down: the client sees a refused connection too.
            debug!(%upstream, "fault proxy: upstream unreachable: {e}");
            counters.refused.fetch_add(1, Relaxed);
            reset(&client);
            return;
        }
    };
    // The proxy forwards what it reads at once; Nagle would add its own delay.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);

    let ending = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let forward = futures::future::try_join(
            pipe(
                client_read,
                server_write,
                control.clone(),
                origin,
                &counters.to_upstream,
            ),
            pipe(
                server_read,
                client_write,
                control.clone(),
                origin,
                &counters.to_client,
            ),
        );
        tokio::select! {
            forwarded = forward => match forwarded {
                Ok(_) => Ending::Closed,
                Err(e) => Ending::Failed(e),
            },
            reset = mode_when(&mut control, origin, |m| m == Mode::Reset) => match reset {
                Ok(_) => Ending::Reset,
                Err(_) => Ending::Stopped,
            },
        }
    };
    match ending {
        Ending::Closed | Ending::Stopped => {}
        Ending::Failed(e) => {
            debug!(%peer, "fault proxy: connection failed: {e}");
            reset(&client);
            reset(&server);
        }
        Ending::Reset => {
            debug!(%peer, "fault proxy: connection reset");
            counters.reset.fetch_add(1, Relaxed);
            reset(&client);
            reset(&server);
        }
    }
}

/// Makes the socket's close (when it is dropped) send a RST instead of a FIN.
fn reset(stream: &TcpStream) {
    if let Err(e) = stream.set_zero_linger() {
        debug!("fault proxy: cannot set SO_LINGER 0: {e}");
    }
}

/// Waits until the connection's mode satisfies `ready`, and returns it. Fails
/// only when the proxy was dropped.
async fn mode_when(
    control: &mut watch::Receiver<Control>,
    origin: Option<u32>,
    ready: impl Fn(Mode) -> bool,
) -> io::Result<Mode> {
    let control = control
        .wait_for(|c| ready(c.mode_for(origin)))
        .await
        .map_err(|_| io::Error::other("fault proxy stopped"))?;
    Ok(control.mode_for(origin))
}

/// Forwards one direction until EOF, then shuts down the write side. The
/// reader and the writer run concurrently through a bounded queue, so a
/// delay stamps each chunk when read and releases it when due without
/// holding up the reads behind it.
async fn pipe(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut control: watch::Receiver<Control>,
    origin: Option<u32>,
    delivered: &AtomicU64,
) -> io::Result<()> {
    let (queue, mut queued) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE_CHUNKS);
    let mut read_control = control.clone();
    let read = async move {
        let mut buf = vec![0; CHUNK];
        loop {
            // In a partition, stop reading: the bytes wait in the kernel.
            mode_when(&mut read_control, origin, |m| {
                matches!(m, Mode::Pass | Mode::Delay(_))
            })
            .await?;
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok(()); // EOF: the writer drains the queue, then shuts down
            }
            let chunk = buf[..n].to_vec();
            if queue.send((Instant::now(), chunk)).await.is_err() {
                return Ok(()); // the writer failed; try_join reports its error
            }
        }
    };
    let write = async move {
        while let Some((read_at, chunk)) = queued.recv().await {
            until_due(&mut control, origin, read_at).await?;
            to.write_all(&chunk).await?;
            delivered.fetch_add(chunk.len() as u64, Relaxed);
        }
        to.shutdown().await
    };
    futures::future::try_join(read, write).await.map(|_| ())
}

/// Waits until a chunk read at `read_at` may be delivered under the current
/// mode, following mode changes while it waits.
async fn until_due(
    control: &mut watch::Receiver<Control>,
    origin: Option<u32>,
    read_at: Instant,
) -> io::Result<()> {
    loop {
        let mode = mode_when(control, origin, |m| {
            matches!(m, Mode::Pass | Mode::Delay(_))
        })
        .await?;
        let Mode::Delay(delay) = mode else {
            return Ok(());
        };
        tokio::select! {
            () = tokio::time::sleep_until(read_at + delay) => return Ok(()),
            changed = control.changed() => {
                changed.map_err(|_| io::Error::other("fault proxy stopped"))?;
            }
        }
    }
}

/// The process that owns the client end of the loopback TCP connection
/// from `client` to `server`: the pid holding the socket whose local address
/// is `client` and remote address is `server`, found through
/// `/proc/net/tcp{,6}` (the socket's inode) and `/proc/<pid>/fd/*` (which
/// process holds `socket:[inode]`). `None` if it cannot be found (not Linux,
/// the client already closed, or its process is not visible to this one).
/// If several processes share the socket (inherited across `fork`), the
/// lowest pid is returned.
///
/// Both addresses are needed: Linux lets two connections share an ephemeral
/// source port when their destinations differ.
///
/// ```no_run
/// # async fn example(listener: tokio::net::TcpListener) -> std::io::Result<()> {
/// let (stream, peer) = listener.accept().await?;
/// let pid = anykv_testkit::proxy::origin_pid(peer, stream.local_addr()?);
/// println!("connection from process {pid:?}");
/// # Ok(())
/// # }
/// ```
pub fn origin_pid(client: SocketAddr, server: SocketAddr) -> Option<u32> {
    let inode = socket_inode(client, server)?;
    socket_owner(inode)
}

/// The inode of the socket with local address `local` and remote `remote`.
fn socket_inode(local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .find_map(|table| {
            let table = std::fs::read_to_string(table).ok()?;
            // Header, then: sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
            table.lines().skip(1).find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let line_local = parse_proc_addr(fields.get(1)?)?;
                let line_remote = parse_proc_addr(fields.get(2)?)?;
                let inode: u64 = fields.get(9)?.parse().ok()?;
                // Inode 0: a socket no process holds any more (e.g. TIME_WAIT).
                (inode != 0 && same_addr(line_local, local) && same_addr(line_remote, remote))
                    .then_some(inode)
            })
        })
}

/// Whether two addresses are the same endpoint, counting an IPv4-mapped IPv6
/// address (a dual-stack socket in `/proc/net/tcp6`) as its IPv4 address.
fn same_addr(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

/// Parses an address of `/proc/net/tcp{,6}`: hex IP then hex port, e.g.
/// `0100007F:1F90` for 127.0.0.1:8080. The kernel prints the IP as 32-bit
/// words in host byte order, so each word's native bytes are the address
/// bytes.
fn parse_proc_addr(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = ip.get(i * 8..(i + 1) * 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::from(word(0)?),
        32 => {
            let mut bytes = [0; 16];
            for (i, out) in bytes.chunks_exact_mut(4).enumerate() {
                out.copy_from_slice(&word(i)?);
            }
            IpAddr::from(bytes)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The lowest pid with a file descriptor on socket `inode`. Processes that
/// vanish or cannot be read during the scan are skipped.
fn socket_owner(inode: u64) -> Option<u32> {
    let target = format!("socket:[{inode}]");
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids.into_iter().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.flatten().any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target.as_str())
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{bail, ensure};
    use tokio::time::timeout;

    /// Bound on every wait that is expected to succeed.
    const LIMIT: Duration = Duration::from_secs(5);

    /// An upstream that echoes every byte back, and half-closes on EOF.
    async fn echo_server() -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                        let _ = write.shutdown().await;
                    }
                });
            }
        });
        Ok(addr)
    }

    async fn proxy_to_echo() -> anyhow::Result<Proxy> {
        Proxy::start("127.0.0.1:0".parse()?, echo_server().await?).await
    }

    async fn connect(proxy: &Proxy) -> anyhow::Result<TcpStream> {
        Ok(timeout(LIMIT, TcpStream::connect(proxy.local_addr())).await??)
    }

    /// Sends `msg` and reads it back; returns how long that took.
    async fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> anyhow::Result<Duration> {
        let start = Instant::now();
        stream.write_all(msg).await?;
        read_back(stream, msg).await?;
        Ok(start.elapsed())
    }

    async fn read_back(stream: &mut TcpStream, msg: &[u8]) -> anyhow::Result<()> {
        let mut back = vec![0; msg.len()];
        timeout(LIMIT, stream.read_exact(&mut back)).await??;
        ensure!(back == msg, "echoed {back:?}, sent {msg:?}");
        Ok(())
    }

    /// Fails if anything (data, EOF or error) arrives within `wait`. A
    /// single `read` is cancel-safe, so nothing is lost when it times out.
    async fn silent_for(stream: &mut TcpStream, wait: Duration) -> anyhow::Result<()> {
        let mut buf = [0; 64];
        match timeout(wait, stream.read(&mut buf)).await {
            Err(_) => Ok(()),
            Ok(read) => bail!("expected silence, got {read:?}"),
        }
    }

    /// Fails unless the connection ends (EOF or error) within `LIMIT`.
    async fn ends(stream: &mut TcpStream) -> anyhow::Result<()> {
        let mut buf = [0; 64];
        match timeout(LIMIT, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => Ok(()),
            Ok(Ok(n)) => bail!("expected the connection to end, read {n} bytes"),
            Err(_) => bail!("connection still open after {LIMIT:?}"),
        }
    }

    /// Fails unless the connection is reset (`ECONNRESET`) within `LIMIT`.
    async fn is_reset(stream: &mut TcpStream) -> anyhow::Result<()> {
        let mut buf = [0; 64];
        match timeout(LIMIT, stream.read(&mut buf)).await {
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
            Ok(read) => bail!("expected a reset, got {read:?}"),
            Err(_) => bail!("connection still open after {LIMIT:?}"),
        }
    }

    #[tokio::test]
    async fn pass_forwards_both_ways_and_counts() -> anyhow::Result<()> {
        let proxy = proxy_to_echo().await?;
        let mut stream = connect(&proxy).await?;
        let took = round_trip(&mut stream, b"hello").await?;
        let stats = proxy.stats();
        ensure!(stats.accepted == 1 && stats.active == 1, "{stats:?}");
        ensure!(
            stats.bytes_to_upstream == 5 && stats.bytes_to_client == 5,
            "{stats:?}"
        );
        println!("pass round trip: {took:?}");
        Ok(())
    }

    #[tokio::test]
    async fn pass_forwards_a_large_stream_and_its_eof() -> anyhow::Result<()> {
        let proxy = proxy_to_echo().await?;
        let stream = connect(&proxy).await?;
        let sent: Vec<u8> = (0..4 * 1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
        let (mut read, mut write) = stream.into_split();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                write.write_all(&sent).await?;
                write.shutdown().await // EOF must travel through the proxy
            })
        };
        let mut back = Vec::new();
        timeout(LIMIT, read.read_to_end(&mut back)).await??;
        writer.await??;
        ensure!(
            back.len() == sent.len() && back == sent,
            "got {} bytes back",
            back.len()
        );
        Ok(())
    }

    #[tokio::test]
    async fn delay_applies_to_an_existing_connection_in_both_directions() -> anyhow::Result<()> {
        let proxy = proxy_to_echo().await?;
        let mut stream = connect(&proxy).await?;
        round_trip(&mut stream, b"warm").await?;
        let delay = Duration::from_millis(200);
        proxy.set_mode(Mode::Delay(delay));
        let took = round_trip(&mut stream, b"slow").await?;
        println!("delayed round trip: {took:?}");
        ensure!(
            took >= 2 * delay,
            "round trip {took:?}, each way delayed {delay:?}"
        );
        ensure!(
            took < 2 * delay + Duration::from_secs(1),
            "round trip {took:?}"
        );
        proxy.set_mode(Mode::Pass);
        let took = round_trip(&mut stream, b"fast").await?;
        ensure!(took < delay, "after Pass the round trip took {took:?}");
        Ok(())
    }

    #[tokio::test]
    async fn delay_is_latency_not_one_chunk_at_a_time() -> anyhow::Result<()> {
        let proxy = proxy_to_echo().await?;
        let mut stream = connect(&proxy).await?;
        round_trip(&mut stream, b"warm").await?;
        let delay = Duration::from_millis(200);
        proxy.set_mode(Mode::Delay(delay));
        // Eight chunks 50 ms apart: pipelined, the last is back about
        // 350 ms + 2 × 200 ms after the first is sent; forwarded one chunk
        // per delay, it would take over 8 × 200 ms.
        let start = Instant::now();
        for i in 0..8u8 {
            stream.write_all(&[i]).await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        read_back(&mut stream, &[0, 1, 2, 3, 4, 5, 6, 7]).await?;
        let took = start.elapsed();
        println!("eight delayed chunks: {took:?}");
        ensure!(took < Duration::from_millis(1200), "took {took:?}");
        Ok(())
    }

    #[tokio::test]
    async fn blackhole_holds_bytes_until_healed() -> anyhow::Result<()> {
        let proxy = proxy_to_echo().await?;
        let mut existing = connect(&proxy).await?;
        round_trip(&mut existing, b"before").await?;

        proxy.set_mode(Mode::Blackhole);
        existing.write_all(b"held").await?;
        // A connection made during the partition is held as well.
        let mut new = connect(&proxy).await?;
        new.write_all(b"new").await?;
        silent_for(&mut existing, Duration::from_millis(500)).await?;
        silent_for(&mut new, Duration::from_millis(100)).await?;
        let stats = proxy.stats();
        ensure!(
            stats.bytes_to_upstream == 6,
            "forwarded during the partition: {stats:?}"
        );

        proxy.set_mode(Mode::Pass);
        read_back(&mut existing, b"held").await?;
        read_back(&mut new, b"new").await?;
        Ok(())
    }

    #[tokio::test]
    async fn reset_closes_existing_connections_and_refuses_new_ones() -> anyhow::Result<()> {
        let proxy = proxy_to_echo().await?;
        let mut existing = connect(&proxy).await?;
        round_trip(&mut existing, b"before").await?;

        let start = Instant::now();
        proxy.set_mode(Mode::Reset);
        is_reset(&mut existing).await?;
        // Accepted by the kernel, then reset at once by the proxy.
        let mut new = connect(&proxy).await?;
        is_reset(&mut new).await?;
        let took = start.elapsed();
        ensure!(took < Duration::from_millis(500), "reset took {took:?}");
        let stats = proxy.stats();
        ensure!(stats.reset == 1 && stats.refused == 1, "{stats:?}");

        proxy.set_mode(Mode::Pass);
        let mut after = connect(&proxy).await?;
        round_trip(&mut after, b"after").await?;
        Ok(())
    }

    #[tokio::test]
    async fn unreachable_upstream_resets_the_client() -> anyhow::Result<()> {
        let closed = {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            listener.local_addr()?
        };
        let proxy = Proxy::start("127.0.0.1:0".parse()?, closed).await?;
        let mut stream = connect(&proxy).await?;
        is_reset(&mut stream).await?;
        ensure!(proxy.stats().refused == 1, "{:?}", proxy.stats());
        Ok(())
    }

    #[tokio::test]
    async fn drop_closes_the_listener_and_every_connection() -> anyhow::Result<()> {
        let proxy = proxy_to_echo().await?;
        let addr = proxy.local_addr();
        let mut held = connect(&proxy).await?;
        round_trip(&mut held, b"x").await?;
        proxy.set_mode(Mode::Blackhole);
        let mut blackholed = connect(&proxy).await?;
        drop(proxy);
        ends(&mut held).await?;
        ends(&mut blackholed).await?;
        ensure!(
            TcpStream::connect(addr).await.is_err(),
            "still listening after drop"
        );
        Ok(())
    }

    #[tokio::test]
    async fn stop_frees_the_port_at_once() -> anyhow::Result<()> {
        let proxy = proxy_to_echo().await?;
        let addr = proxy.local_addr();
        let mut stream = connect(&proxy).await?;
        round_trip(&mut stream, b"x").await?;
        timeout(LIMIT, proxy.stop()).await?;
        ends(&mut stream).await?;
        let _rebound = TcpListener::bind(addr).await?;
        Ok(())
    }

    #[tokio::test]
    async fn block_origin_blackholes_only_that_process() -> anyhow::Result<()> {
        let proxy = proxy_to_echo().await?;
        let mut existing = connect(&proxy).await?;
        round_trip(&mut existing, b"before").await?;

        // Another process blocked: this one's traffic still passes.
        proxy.block_origin(u32::MAX);
        round_trip(&mut existing, b"other").await?;

        let me = std::process::id();
        proxy.block_origin(me);
        existing.write_all(b"held").await?;
        let mut new = connect(&proxy).await?;
        new.write_all(b"new").await?;
        silent_for(&mut existing, Duration::from_millis(500)).await?;
        silent_for(&mut new, Duration::from_millis(100)).await?;
        ensure!(proxy.mode() == Mode::Pass);

        proxy.unblock_origin(me);
        read_back(&mut existing, b"held").await?;
        read_back(&mut new, b"new").await?;
        Ok(())
    }

    #[tokio::test]
    async fn origin_pid_finds_this_process() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let _client = TcpStream::connect(listener.local_addr()?).await?;
        let (server, peer) = timeout(LIMIT, listener.accept()).await??;
        let local = server.local_addr()?;
        let start = std::time::Instant::now();
        let pid = tokio::task::spawn_blocking(move || origin_pid(peer, local)).await?;
        println!("origin lookup: {:?}", start.elapsed());
        ensure!(pid == Some(std::process::id()), "found {pid:?}");
        // The server end is this process too, but it is not the client end.
        let reversed = origin_pid(local, "127.0.0.1:1".parse()?);
        ensure!(
            reversed.is_none(),
            "found {reversed:?} for a connection that does not exist"
        );
        Ok(())
    }

    #[tokio::test]
    async fn origin_pid_finds_another_process() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        // bash keeps the connection open until it reads a line or 10 s pass.
        let mut child = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "exec 3<>/dev/tcp/127.0.0.1/{port}; read -t 10 -u 3 line"
            ))
            .spawn()?;
        let accepted = timeout(LIMIT, listener.accept()).await;
        let found = match &accepted {
            Ok(Ok((server, peer))) => {
                let (peer, local) = (*peer, server.local_addr()?);
                tokio::task::spawn_blocking(move || origin_pid(peer, local)).await?
            }
            _ => None,
        };
        let _ = child.kill();
        let _ = child.wait();
        accepted??;
        ensure!(
            found == Some(child.id()),
            "found {found:?}, child is {}",
            child.id()
        );
        Ok(())
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn parses_proc_net_tcp_addresses() {
        let v4 = parse_proc_addr("0100007F:1F90");
        assert_eq!(v4, Some("127.0.0.1:8080".parse().expect("addr")));
        let mapped = parse_proc_addr("0000000000000000FFFF00000100007F:0050").expect("mapped");
        assert!(same_addr(mapped, "127.0.0.1:80".parse().expect("addr")));
        let v6 = parse_proc_addr("00000000000000000000000001000000:0016");
        assert_eq!(v6, Some("[::1]:22".parse().expect("addr")));
        assert_eq!(parse_proc_addr("0100007F"), None);
        assert_eq!(parse_proc_addr("7F:0050"), None);
    }
}
