//! An application function tested against injected faults, with no server.
//!
//! `place_order` is the application code under test: it must record each
//! order exactly once although the store fails some calls. The chaos layer
//! sits below the standard layers, so its faults look like the driver's:
//! reads that fail are retried by the retry layer and never reach the
//! application; a failed write may or may not have been applied (the
//! network can fail after the server committed), so the layer does not
//! retry it and the application must: it writes with `if_absent` and treats
//! "already exists with my value" as success. Then the store is switched
//! unreachable: liveness goes false, calls fail with `Unavailable`, and all
//! recovers once it is switched back.
//!
//! ```text
//! cargo run --example chaos_test                                  # memory://
//! cargo run --example chaos_test -- redb://chaos.redb --rate 0.3 --orders 200
//! ```

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use anykv::{
    ErrorKind, Kv, LayerConfig, Prefix, PutOptions, RetryPolicy, Store, layers::chaos::ChaosLayer,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

/// An order, as the application stores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// Who ordered.
    pub customer: String,
    /// How many.
    pub quantity: u32,
}

/// The application's outcome of `place_order`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// Recorded by this call (possibly by an earlier attempt of it).
    Recorded,
    /// Another order already holds this id.
    Duplicate,
}

/// Attempts of one `place_order` before it gives up.
const ATTEMPTS: u32 = 8;

/// Records order `id` exactly once, retrying failures that may be
/// transient. Returns how many attempts it took along with the outcome.
pub async fn place_order(kv: &Kv, id: &str, order: &Order) -> anykv::Result<(Placed, u32)> {
    let key = anykv::Key::new(format!("orders/{id}"))?;
    let value: anykv::Bytes = serde_json::to_vec(order)
        .map_err(|e| anykv::Error::Codec {
            key: key.to_string(),
            source: Box::new(e),
        })?
        .into();
    let mut attempt = 0;
    loop {
        attempt += 1;
        match kv.put(&key, value.clone(), PutOptions::if_absent()).await {
            Ok(_) => return Ok((Placed::Recorded, attempt)),
            // Either an earlier attempt of ours landed before its answer was
            // lost, or someone else used the id: the stored value tells.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let stored = kv.get(&key).await?.map(|p| p.value);
                let placed = if stored.as_ref() == Some(&value) {
                    Placed::Recorded
                } else {
                    Placed::Duplicate
                };
                return Ok((placed, attempt));
            }
            // Transient: back off and try the same conditional write again;
            // `if_absent` makes the repeat safe.
            Err(e) if e.is_retryable() && attempt < ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// What the run saw, for the example's test.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Orders placed successfully.
    pub placed: usize,
    /// Orders found in the store afterwards.
    pub stored: usize,
    /// Attempts beyond the first that `place_order` needed, in all.
    pub app_retries: u32,
    /// Faults the chaos layer injected.
    pub injected: u64,
    /// The error kind of a call made while the store was unreachable.
    pub outage_error: Option<ErrorKind>,
    /// Liveness states seen, in order (deduplicated).
    pub liveness: Vec<bool>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = anykv_examples::Args::parse(&["rate", "orders", "seed"])?;
    let url = args.positional(0, "memory://chaos-demo");
    let rate = args.value("rate", 0.2)?;
    let orders = args.value("orders", 100)?;
    let seed = args.value("seed", 7)?;
    let o = run(&url, rate, orders, seed).await?;
    // Every injected fault is an `Unavailable`, so liveness drops on the
    // flaky calls too and comes back with the next success.
    let drops = o.liveness.iter().filter(|alive| !**alive).count();
    println!(
        "{} orders placed, {} stored, {} app-level retries over {} injected faults; \
         outage answered {:?}; liveness dropped {drops} times, alive at the end: {:?}",
        o.placed,
        o.stored,
        o.app_retries,
        o.injected,
        o.outage_error,
        o.liveness.last()
    );
    Ok(())
}

/// Places `orders` orders at `url` with `rate` of the calls failing, then
/// through an outage; fails if an order is lost or doubled.
pub async fn run(url: &str, rate: f64, orders: usize, seed: u64) -> anyhow::Result<Outcome> {
    let chaos = ChaosLayer::new(seed)
        .error_rate(rate)
        .latency(Duration::from_millis(1));
    let switch = chaos.handle();
    let kv = anykv::builder(url)
        // Below the standard layers: retry, timeout and liveness see the
        // faults as a real outage's.
        .layer_below(chaos)
        // More attempts than the default 3, so that reads rarely fail at
        // the application's level even at high error rates.
        .retry(RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(2),
            ..RetryPolicy::default()
        })
        // A short timeout and a background probe: an outage is noticed and
        // its end detected quickly (the probe brings liveness back).
        .config(LayerConfig {
            probe_interval: Some(Duration::from_millis(50)),
            liveness_interval: Duration::from_millis(50),
            ..LayerConfig::default()
        })
        .timeout(Duration::from_millis(500))
        .open()
        .await
        .with_context(|| format!("opening {url}"))?;
    // Start from a clean slate (a store that survived an earlier run).
    clean(&kv).await?;

    let mut out = Outcome::default();
    // Record liveness as it changes; the stream lives as long as the
    // store handle, so the task is stopped by hand at the end.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<bool>::new()));
    let mut liveness_states = kv.liveness().subscribe();
    let recorder = tokio::spawn({
        let seen = seen.clone();
        async move {
            while let Some(alive) = liveness_states.next().await {
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                if seen.last() != Some(&alive) {
                    seen.push(alive);
                }
            }
        }
    });

    // Phase 1: flaky store.
    for i in 0..orders {
        let order = Order {
            customer: format!("customer-{}", i % 7),
            quantity: 1 + (i % 5) as u32,
        };
        let (placed, attempts) = place_order(&kv, &format!("{i:05}"), &order)
            .await
            .with_context(|| format!("order {i}"))?;
        ensure!(
            placed == Placed::Recorded,
            "order {i} reported as a duplicate"
        );
        out.placed += 1;
        out.app_retries += attempts - 1;
    }
    out.stored = count_orders(&kv).await?;
    ensure!(
        out.stored == orders,
        "{} orders stored for {orders} placed",
        out.stored
    );
    println!(
        "flaky phase: {orders} orders, {} app-level retries, {} faults injected",
        out.app_retries,
        switch.injected()
    );

    // Phase 2: an outage. Calls fail fast with Unavailable (after the
    // layer's retries) and liveness goes false.
    switch.set_unreachable(true);
    let outage = kv.get(&anykv::Key::new("orders/00000")?).await;
    out.outage_error = outage.err().map(|e| e.kind());
    wait_liveness(&kv, false).await?;
    println!(
        "outage: calls answer {:?}, liveness false",
        out.outage_error
    );

    // Phase 3: back. The probe sees the store again; the application works.
    switch.set_unreachable(false);
    wait_liveness(&kv, true).await?;
    let (placed, _) = place_order(
        &kv,
        "after-outage",
        &Order {
            customer: "late".into(),
            quantity: 1,
        },
    )
    .await?;
    ensure!(
        placed == Placed::Recorded,
        "the order after the outage failed"
    );
    out.placed += 1;
    println!("recovered: liveness true, orders accepted again");

    out.injected = switch.injected();
    recorder.abort();
    kv.close().await?;
    out.liveness = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(out)
}

/// Deletes earlier runs' orders, retrying injected faults.
async fn clean(kv: &Kv) -> anyhow::Result<()> {
    let orders = Prefix::new("orders")?;
    for _ in 0..ATTEMPTS {
        match kv.delete_prefix(&orders).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_retryable() => {}
            Err(e) => return Err(e.into()),
        }
    }
    bail!("could not clear the orders")
}

/// Counts stored orders; `list` is idempotent, so the retry layer handles
/// the faults.
async fn count_orders(kv: &Kv) -> anyhow::Result<usize> {
    Ok(kv.list(&Prefix::new("orders")?).await?.len())
}

/// Waits (bounded) until liveness reaches `alive`.
async fn wait_liveness(kv: &Kv, alive: bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while kv.liveness().is_alive() != alive {
        if tokio::time::Instant::now() > deadline {
            bail!("liveness did not become {alive} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
