//! The connection: made on first use, bounded by the timeout, shared by
//! every operation and background task of a store.

use std::{future::Future, sync::Arc, time::Duration};

use anykv_core::{Error, Result};
use etcd_client::{Client, KvClient, LeaseClient, WatchClient};
use tokio::sync::OnceCell;

use crate::{
    error::{self, BACKEND, Ctx},
    health::{self, Health},
    options::EtcdOptions,
    watch::Hub,
};

/// Largest response the driver accepts (a page of `list`, a batch of watch
/// events). etcd-client's default is 4 MiB, less than four 1 MiB values.
const MAX_DECODE: usize = 64 << 20;

/// The gRPC clients of one connection (cheap clones of one balanced channel).
#[derive(Clone)]
pub(crate) struct Clients {
    /// Kept so that the balanced channel's endpoint list stays open.
    _client: Client,
    /// Takes hung members out of the balancer (several endpoints only).
    _health: Option<Arc<Health>>,
    _heartbeat: Arc<Heartbeat>,
    pub kv: KvClient,
    pub watch: WatchClient,
    pub lease: LeaseClient,
}

/// A lazily made connection to the cluster.
pub(crate) struct Conn {
    pub opts: EtcdOptions,
    clients: OnceCell<Clients>,
    /// The shared watch streams.
    pub(crate) watches: Hub,
    /// How often a request whose connection could not even be opened is sent
    /// again (each time the balancer may pick another member).
    unsent_retries: usize,
}

impl Conn {
    pub(crate) fn new(opts: EtcdOptions) -> Conn {
        let unsent_retries = 2 * opts.endpoints.len();
        Conn {
            opts,
            clients: OnceCell::new(),
            watches: Hub::new(),
            unsent_retries,
        }
    }

    /// The driver's own timeout.
    pub(crate) fn timeout(&self) -> Duration {
        self.opts.timeout
    }

    /// The clients, connecting first if needed.
    ///
    /// Without authentication etcd-client connects lazily: this returns at
    /// once and the first request opens the channel. With authentication it
    /// must log in first; that round trip is bounded by the timeout and a
    /// failure leaves the cell empty, so the next operation tries again.
    pub(crate) async fn clients(&self) -> Result<&Clients> {
        self.clients.get_or_try_init(|| connect(&self.opts)).await
    }

    /// Runs one request, sending it again while its connection could not be
    /// opened (a dead member in the endpoint list), and maps the error.
    pub(crate) async fn call<T, F, Fut>(&self, ctx: Ctx<'_>, mut request: F) -> Result<T>
    where
        F: FnMut(&Clients) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let clients = self.clients().await?;
        let mut retries = 0;
        loop {
            match request(clients).await {
                Ok(v) => return Ok(v),
                Err(e) if retries < self.unsent_retries && error::never_sent(&e) => {
                    retries += 1;
                    tracing::debug!(error = %e, retries, "etcd: connection refused, sending again");
                    // Let the balancer see the failed endpoint before picking again.
                    tokio::time::sleep(Duration::from_millis(5 * retries as u64)).await;
                }
                Err(e) => return Err(error::map(e, ctx)),
            }
        }
    }
}

async fn connect(opts: &EtcdOptions) -> Result<Clients> {
    let ctx = Ctx::new("connect", None, opts.timeout);
    let connecting = Client::connect(opts.urls(), Some(opts.connect_options()));
    let client = match tokio::time::timeout(opts.timeout, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(error::map(e, ctx)),
        Err(_) => {
            return Err(Error::Unavailable {
                backend: BACKEND,
                message: format!(
                    "could not log in to {} within {:?}",
                    opts.endpoints.join(","),
                    opts.timeout
                ),
                source: None,
            });
        }
    };
    Ok(Clients {
        kv: client.kv_client().max_decoding_message_size(MAX_DECODE),
        watch: client.watch_client().max_decoding_message_size(MAX_DECODE),
        lease: client.lease_client(),
        _health: health::spawn(client.clone(), opts).map(Arc::new),
        _heartbeat: Arc::new(Heartbeat::spawn(opts.timeout)),
        _client: client,
    })
}

/// `from + d`, saturating far in the future instead of overflowing (a huge
/// `?timeout=` or a lease TTL from a misbehaving server must not panic).
pub(crate) fn after(from: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    from.checked_add(d).unwrap_or_else(|| from + YEAR)
}

/// A timer that is always pending, earlier than any operation's deadline.
///
/// The layers bound every operation with a tokio timeout. When that timer is
/// the earliest the runtime has, registering it wakes the thread parked in
/// the I/O driver so that it re-parks with the shorter deadline: a syscall
/// and a context switch per operation, measured at 7-10 µs on a 150 µs etcd
/// get. With this heartbeat pending (it wakes once per half timeout, at most
/// once a second) a new deadline is never the earliest, and costs nothing.
struct Heartbeat(tokio::task::JoinHandle<()>);

impl Heartbeat {
    fn spawn(timeout: Duration) -> Heartbeat {
        let every = (timeout / 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        Heartbeat(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
            }
        }))
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}
