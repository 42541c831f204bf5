//! Which agent a request goes to. A URL may name several agents
//! (`consul://a:8500,b:8500,c:8500`, e.g. the servers of a cluster): the
//! driver sends every request to the current one and moves to the next
//! when the current one fails to answer (no connection, no answer within
//! the deadline, 5xx/429), so a killed, frozen or leaderless agent costs
//! one failed attempt, not the store. All agents of a datacenter serve the
//! same KV store, sessions and Raft indexes, so nothing else changes.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anykv_core::Result;
use tokio::{sync::watch, time::Instant};

use crate::error;

/// The URLs of one agent, parsed once.
#[derive(Debug)]
pub(crate) struct Agent {
    /// `http(s)://host:port/v1`.
    pub base: String,
    /// `…/v1/txn`.
    pub txn: reqwest::Url,
    /// `…/v1/status/leader`.
    pub leader: reqwest::Url,
}

/// The agents of the URL and the current one.
#[derive(Debug)]
pub(crate) struct Agents {
    agents: Vec<Agent>,
    current: AtomicUsize,
    /// Bumped on every move: a blocking query pending on the agent just
    /// left is sent again to the new one.
    moved: watch::Sender<u64>,
}

impl Agents {
    /// From the agents' base URLs (at least one).
    pub(crate) fn new(bases: &[String]) -> Result<Agents> {
        let url = |base: &str, path: &str| {
            reqwest::Url::parse(&format!("{base}/{path}"))
                .map_err(|e| error::internal(format!("building the URL for {path}"), e))
        };
        let agents = bases
            .iter()
            .map(|base| {
                Ok(Agent {
                    base: base.clone(),
                    txn: url(base, "txn")?,
                    leader: url(base, "status/leader")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Agents {
            agents,
            current: AtomicUsize::new(0),
            moved: watch::channel(0).0,
        })
    }

    /// The current agent and its position (for [`failed`](Self::failed)).
    pub(crate) fn pick(&self) -> (usize, &Agent) {
        let i = self.current.load(Ordering::Relaxed) % self.agents.len();
        (i, &self.agents[i])
    }

    /// Agent `i` failed to answer: move to the next one, unless another
    /// failure already moved away from it (so concurrent failures of one
    /// agent move once, not once each).
    pub(crate) fn failed(&self, i: usize) {
        let n = self.agents.len();
        if n < 2 {
            return;
        }
        if self
            .current
            .compare_exchange(i, (i + 1) % n, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::debug!(
                from = %self.agents[i].base,
                to = %self.agents[(i + 1) % n].base,
                "consul agent failed to answer; moving to the next"
            );
            self.moved.send_modify(|g| *g += 1);
        }
    }

    /// Changes whenever requests move to another agent.
    pub(crate) fn moved(&self) -> watch::Receiver<u64> {
        self.moved.subscribe()
    }
}

/// Reports a request to agent `i` as failed if it is dropped unfinished
/// after most of its deadline: the caller's own timeout (the layers' per
/// operation one, which starts a little earlier) cancelled a request the
/// agent did not answer in time. Earlier cancellations (a dropped watch, a
/// stopped lock keeper) say nothing about the agent.
pub(crate) struct Pending<'a> {
    agents: &'a Agents,
    index: usize,
    started: Instant,
    deadline: Duration,
    done: bool,
}

impl<'a> Pending<'a> {
    pub(crate) fn new(agents: &'a Agents, index: usize, deadline: Duration) -> Self {
        Pending {
            agents,
            index,
            started: Instant::now(),
            deadline,
            done: false,
        }
    }

    /// The request ended; `agent_failed` says whether the agent is to blame.
    pub(crate) fn finish(mut self, agent_failed: bool) {
        self.done = true;
        if agent_failed {
            self.agents.failed(self.index);
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done && self.started.elapsed() >= self.deadline.mul_f64(0.8) {
            self.agents.failed(self.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agents(n: usize) -> Agents {
        let bases: Vec<String> = (0..n).map(|i| format!("http://h{i}:8500/v1")).collect();
        Agents::new(&bases).unwrap()
    }

    #[test]
    fn a_failure_moves_to_the_next_agent_once() {
        let a = agents(3);
        let moved = a.moved();
        assert_eq!(a.pick().0, 0);
        a.failed(0);
        assert_eq!(a.pick().0, 1);
        a.failed(0); // a second failure of the agent already left
        assert_eq!(a.pick().0, 1, "moved once");
        assert!(moved.has_changed().unwrap());
        a.failed(1);
        a.failed(2);
        assert_eq!(a.pick().0, 0, "round robin");
        assert_eq!(a.pick().1.txn.as_str(), "http://h0:8500/v1/txn");
    }

    #[test]
    fn one_agent_never_moves() {
        let a = agents(1);
        let moved = a.moved();
        a.failed(0);
        assert_eq!(a.pick().0, 0);
        assert!(!moved.has_changed().unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_late_cancellation_blames_the_agent() {
        let a = agents(2);
        drop(Pending::new(&a, 0, Duration::from_secs(1)));
        assert_eq!(a.pick().0, 0, "cancelled early: a dropped watch");
        let p = Pending::new(&a, 0, Duration::from_secs(1));
        tokio::time::advance(Duration::from_millis(950)).await;
        drop(p);
        assert_eq!(a.pick().0, 1, "cancelled at the deadline: no answer");
        Pending::new(&a, 1, Duration::from_secs(1)).finish(false);
        assert_eq!(a.pick().0, 1);
        Pending::new(&a, 1, Duration::from_secs(1)).finish(true);
        assert_eq!(a.pick().0, 0);
    }
}
