//! The metrics layer, served for Prometheus on `/metrics`.
//!
//! The store is opened with the metrics layer outermost (it counts each call
//! once, as the application made it); `metrics-exporter-prometheus`
//! records what it emits and renders the text format, which this example
//! serves itself on `/metrics` (a few lines of HTTP, no web framework). A
//! background workload (puts, gets, a watch, a lock) gives it numbers.
//!
//! ```text
//! cargo run --example metrics                          # memory://, http://127.0.0.1:9898/metrics
//! cargo run --example metrics -- redb://m.redb --listen 127.0.0.1:9000 --scrapes 3
//! curl -s http://127.0.0.1:9898/metrics | grep anykv_
//! ```
//!
//! It serves until Ctrl-C, or until `--scrapes N` requests of `/metrics`
//! were answered, or `--seconds S` passed. The metrics and their labels are
//! listed in `anykv::layers::metrics`.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use anykv::{
    Key, Kv, LockOptions, Prefix, Start, Store, StoreExt, Target, layers::metrics::MetricsLayer,
};
use futures::StreamExt;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Latency buckets in seconds, from an in-memory call (~10 µs) to a
/// timed-out one (5 s, the default timeout).
const LATENCY_BUCKETS: [f64; 12] = [
    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
];

/// When to stop serving.
#[derive(Clone, Copy, Debug, Default)]
pub struct Until {
    /// After this many `/metrics` answers.
    pub scrapes: Option<u64>,
    /// After this long.
    pub duration: Option<Duration>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = anykv_examples::Args::parse(&["listen", "scrapes", "seconds"])?;
    let url = args.positional(0, "memory://metrics-demo");
    let listen: SocketAddr = args.value("listen", SocketAddr::from(([127, 0, 0, 1], 9898)))?;
    let until = Until {
        scrapes: args
            .value::<u64>("scrapes", 0)
            .map(|n| (n > 0).then_some(n))?,
        duration: args.value::<f64>("seconds", 0.0).map(|s| {
            (s > 0.0)
                .then(|| Duration::try_from_secs_f64(s).ok())
                .flatten()
        })?,
    };
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    println!("serving http://{}/metrics", listener.local_addr()?);
    let scrapes = run(&url, listener, until).await?;
    println!("answered {scrapes} scrapes");
    Ok(())
}

/// Opens `url` with the metrics layer, runs a workload and serves
/// `/metrics` on `listener` until `until` (or Ctrl-C). Returns how many
/// scrapes were answered.
pub async fn run(url: &str, listener: TcpListener, until: Until) -> anyhow::Result<u64> {
    // The process-wide recorder: every `metrics` call lands in it.
    let handle = PrometheusBuilder::new()
        // Buckets make the latency a Prometheus histogram (aggregatable
        // across instances) rather than the exporter's default summary.
        .set_buckets_for_metric(
            Matcher::Full("anykv_operation_duration_seconds".into()),
            &LATENCY_BUCKETS,
        )?
        .install_recorder()
        .context("installing the Prometheus recorder")?;
    let kv = anykv::builder(url)
        .layer(MetricsLayer)
        .open()
        .await
        .with_context(|| format!("opening {url}"))?;
    let workload = tokio::spawn(workload(kv.clone()));

    let stop = async {
        match until.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    let mut scrapes = 0;
    while until.scrapes.is_none_or(|max| scrapes < max) {
        let conn = tokio::select! {
            conn = listener.accept() => conn,
            () = &mut stop => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let (stream, peer) = match conn {
            Ok(c) => c,
            // A failed accept (the peer gave up, too many files) concerns
            // one connection, not the server.
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        match answer(stream, &handle).await {
            Ok(true) => scrapes += 1,
            Ok(false) => {}
            Err(e) => eprintln!("{peer}: {e}"),
        }
    }
    workload.abort();
    kv.close().await?;
    Ok(scrapes)
}

/// Answers one HTTP request: the metrics on `GET /metrics`, 404 otherwise.
/// Returns whether it served the metrics.
async fn answer(mut stream: TcpStream, handle: &PrometheusHandle) -> anyhow::Result<bool> {
    // Only the request line matters; a slow or silent client is dropped.
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .context("request timed out")??;
    let request = String::from_utf8_lossy(&buf[..n]);
    let is_metrics = request
        .lines()
        .next()
        .is_some_and(|line| line.starts_with("GET /metrics ") || line == "GET /metrics");
    let (status, body) = if is_metrics {
        // Keeps histograms' sliding windows current before rendering.
        handle.run_upkeep();
        ("200 OK", handle.render())
    } else {
        ("404 Not Found", "try /metrics\n".to_owned())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(is_metrics)
}

/// A small steady load, so that every kind of metric has values: writes
/// and reads, a missing key (an error outcome), an open watch, a held lock.
async fn workload(kv: Kv) -> anyhow::Result<()> {
    let mut watch = kv
        .watch(Target::Prefix(Prefix::new("load")?), Start::Now)
        .await?;
    tokio::spawn(async move { while watch.next().await.is_some() {} });
    let lock = kv
        .lock(&Key::new("locks/demo")?, LockOptions::default())
        .await?;
    let mut i = 0u64;
    loop {
        kv.set(&format!("load/{}", i % 10), i.to_string()).await?;
        kv.value(&format!("load/{}", i % 10)).await?;
        let _ = kv
            .delete(&Key::new("load/missing")?, anykv::Condition::IfPresent)
            .await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if lock.is_lost() {
            anyhow::bail!("lost the demo lock");
        }
    }
}
