//! Evens out client connections over the worker threads.
//!
//! With `--workers N` each worker accepts on its own `SO_REUSEPORT` socket and the
//! kernel hashes every new connection to one of them: even on average, but not for a
//! few long-lived keep-alive connections (an outer load balancer holds a handful; 64
//! benchmark connections split anywhere from 32/32 to 25/41 here). The worker with
//! more connections gets more requests, its core saturates first and its clients
//! wait longer. So a worker that accepts a connection while it holds more open
//! connections than the least loaded worker hands the socket to that one (through a
//! channel: one wake-up of the other thread, once per connection); the other serves
//! it on its own runtime and upstream pools. Open counts then stay within one of each
//! other whatever the kernel's hash did, and nothing crosses threads per request.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus::{IntCounter, IntGauge};
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::observe::metrics::{GaugeGuard, Metrics};

/// A client connection on its way to another worker, with the `max_connections`
/// permit it was accepted under.
#[derive(Debug)]
pub struct Handoff {
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    pub permit: Option<OwnedSemaphorePermit>,
}

/// The workers' open connection counts and their inboxes.
pub struct Balance {
    open: Box<[IntGauge]>,
    inboxes: Box<[UnboundedSender<Handoff>]>,
    receivers: Mutex<Vec<Option<UnboundedReceiver<Handoff>>>>,
    handed_off: IntCounter,
}

impl Balance {
    pub fn new(workers: usize, metrics: &Metrics) -> Arc<Self> {
        let (inboxes, receivers) = (0..workers)
            .map(|_| unbounded_channel())
            .unzip::<_, _, Vec<_>, Vec<_>>();
        Arc::new(Self {
            open: (0..workers)
                .map(|i| {
                    metrics
                        .worker_connections
                        .with_label_values(&[i.to_string().as_str()])
                })
                .collect(),
            inboxes: inboxes.into(),
            receivers: Mutex::new(receivers.into_iter().map(Some).collect()),
            handed_off: metrics.connections_handed_off.clone(),
        })
    }

    /// Worker `index`'s side of the balance.
    pub fn worker(self: &Arc<Self>, index: usize) -> Worker {
        Worker {
            index,
            balance: Arc::clone(self),
        }
    }
}

/// One worker's side of the [`Balance`].
#[derive(Clone)]
pub struct Worker {
    index: usize,
    balance: Arc<Balance>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("index", &self.index)
            .finish()
    }
}

impl Worker {
    /// The connections other workers hand this one (once: its accept loop owns them).
    pub fn take_inbox(&self) -> Option<UnboundedReceiver<Handoff>> {
        self.balance
            .receivers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(self.index)?
            .take()
    }

    /// The worker a connection this one just accepted should go to; `None`: serve it
    /// here.
    pub fn target(&self) -> Option<usize> {
        hand_off_to(self.balance.open.iter().map(IntGauge::get), self.index)
    }

    /// Sends `handoff` to worker `to`; gives it back if that worker stopped accepting.
    pub fn hand_off(&self, to: usize, handoff: Handoff) -> Result<(), Handoff> {
        let sent = self.balance.inboxes[to].send(handoff).map_err(|e| e.0);
        if sent.is_ok() {
            self.balance.handed_off.inc();
        }
        sent
    }

    /// Counts a connection this worker serves until the guard drops.
    pub fn serving(&self) -> GaugeGuard {
        GaugeGuard::new(self.balance.open[self.index].clone())
    }
}

/// The least loaded worker (the first of them), when worker `me` holds more open
/// connections than it.
fn hand_off_to(open: impl IntoIterator<Item = i64>, me: usize) -> Option<usize> {
    let mut least = (usize::MAX, i64::MAX);
    let mut mine = None;
    for (index, count) in open.into_iter().enumerate() {
        if count < least.1 {
            least = (index, count);
        }
        if index == me {
            mine = Some(count);
        }
    }
    mine.filter(|&mine| mine > least.1).map(|_| least.0)
}

#[cfg(test)]
mod tests {
    use super::hand_off_to;

    #[test]
    fn a_connection_goes_to_the_least_loaded_worker_only_when_this_one_holds_more() {
        assert_eq!(hand_off_to([3, 3], 0), None);
        assert_eq!(hand_off_to([4, 3], 0), Some(1));
        assert_eq!(hand_off_to([4, 3], 1), None);
        assert_eq!(hand_off_to([5, 2, 2, 7], 3), Some(1));
        assert_eq!(hand_off_to([0], 0), None);
        assert_eq!(hand_off_to([1, 0], 5), None);
        // Accepting 64 connections one after another, whatever worker the kernel
        // picks each time, ends within one of even.
        let mut open = [0i64; 3];
        for i in 0..64 {
            let accepted_by = (i * 7 + i / 3) % 3;
            let to = hand_off_to(open, accepted_by).unwrap_or(accepted_by);
            open[to] += 1;
        }
        assert_eq!(open.iter().sum::<i64>(), 64);
        assert!(
            open.iter().max().unwrap() - open.iter().min().unwrap() <= 1,
            "{open:?}"
        );
    }
}
