//! Member health, for stores with several endpoints.
//!
//! The balanced channel only learns that a member is gone when a request to
//! it fails. A dead member refuses connections at once (and those requests
//! are sent again, see `conn`), but a hung one (stopped process, black-holed
//! host) accepts them and never answers, so every request the balancer sends
//! there costs a whole timeout. A background task therefore asks every
//! member for its status, each on a connection of its own, once a second; a
//! member that fails twice in a row leaves the balancer, and comes back as
//! soon as it answers again. The last member standing is never removed.
//!
//! `Status` needs no authentication, so the checks do not log in.

use std::time::Duration;

use etcd_client::{Client, MaintenanceClient};
use tokio::task::JoinHandle;

use crate::options::EtcdOptions;

/// How often every member is checked.
const EVERY: Duration = Duration::from_secs(1);
/// Failed checks in a row before a member leaves the balancer.
const STRIKES: u32 = 2;

/// The checking task; stops when dropped.
pub(crate) struct Health(JoinHandle<()>);

impl Drop for Health {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts checking the members of `client` (nothing to do with one endpoint).
pub(crate) fn spawn(client: Client, opts: &EtcdOptions) -> Option<Health> {
    if opts.endpoints.len() < 2 {
        return None;
    }
    let mut probe_opts = opts.clone();
    probe_opts.user = None;
    let bound = opts
        .timeout
        .clamp(Duration::from_millis(200), Duration::from_secs(1));
    Some(Health(tokio::spawn(run(client, probe_opts, bound))))
}

struct Member {
    url: String,
    probe: Option<MaintenanceClient>,
    strikes: u32,
    balanced: bool,
}

async fn run(client: Client, opts: EtcdOptions, bound: Duration) {
    let mut members: Vec<Member> = opts
        .urls()
        .into_iter()
        .map(|url| Member {
            url,
            probe: None,
            strikes: 0,
            balanced: true,
        })
        .collect();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let checks = members.iter_mut().map(|m| check(m, &opts, bound));
        let healthy = futures::future::join_all(checks).await;
        for (i, ok) in healthy.into_iter().enumerate() {
            let in_balancer = members.iter().filter(|m| m.balanced).count();
            let m = &mut members[i];
            if ok {
                m.strikes = 0;
                if !m.balanced && client.add_endpoint(&m.url).await.is_ok() {
                    tracing::info!(endpoint = %m.url, "etcd: member answers again; back in the balancer");
                    m.balanced = true;
                }
            } else {
                m.strikes += 1;
                if m.balanced
                    && m.strikes >= STRIKES
                    && in_balancer > 1
                    && client.remove_endpoint(&m.url).await.is_ok()
                {
                    tracing::warn!(endpoint = %m.url, "etcd: member does not answer; out of the balancer");
                    m.balanced = false;
                }
            }
        }
    }
}

/// One status round trip to one member, on its own connection.
async fn check(m: &mut Member, opts: &EtcdOptions, bound: Duration) -> bool {
    if m.probe.is_none() {
        // Connecting without credentials makes no request: it cannot hang.
        match Client::connect([m.url.as_str()], Some(opts.connect_options())).await {
            Ok(c) => m.probe = Some(c.maintenance_client()),
            Err(_) => return false,
        }
    }
    let Some(probe) = m.probe.as_mut() else {
        return false;
    };
    matches!(tokio::time::timeout(bound, probe.status()).await, Ok(Ok(_)))
}
