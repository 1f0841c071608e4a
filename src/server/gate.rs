//! Polling a connection's watchers only when they have something to say.
//!
//! A connection task is woken two or three times per request (the client's bytes,
//! the backend's answer, the write), and every wake used to poll everything it
//! waits on: the drain and force-close tokens, the park tick, the idle timer. Those
//! polls cost more than 1,000 instructions a request (callgrind, issue 30) to learn,
//! almost always, that nothing happened. A [`Gate`] gives such watchers a waker of
//! their own: when one fires, the gate records it and wakes the task; the task polls
//! the watchers again only then. What is skipped is exactly a poll that would have
//! returned `Pending` with the same task to wake.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Wake, Waker};

use futures_util::task::AtomicWaker;

/// The waker handed to gated watchers, and whether one of them fired since the
/// watchers were last polled.
pub struct Gate {
    inner: Arc<Inner>,
    waker: Waker,
    /// The watchers were polled (and registered [`Gate::waker`]) since the last
    /// [`Gate::rearm`]: until the gate is woken, polling them again is pointless.
    armed: bool,
}

struct Inner {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Inner {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

impl Gate {
    pub fn new() -> Self {
        let inner = Arc::new(Inner {
            woken: AtomicBool::new(false),
            task: AtomicWaker::new(),
        });
        Self {
            waker: Waker::from(Arc::clone(&inner)),
            inner,
            armed: false,
        }
    }

    /// Whether the watchers must be polled now: on the first call, after
    /// [`Gate::rearm`], or when one of them woke the gate. Registers `cx`'s task as
    /// the one to wake, so a watcher firing later wakes the current task.
    pub fn open(&mut self, cx: &Context<'_>) -> bool {
        self.inner.task.register(cx.waker());
        let woken = self.inner.woken.swap(false, Ordering::AcqRel);
        let open = woken || !self.armed;
        self.armed = true;
        open
    }

    /// The next [`Gate::open`] polls the watchers whatever happened: for a watcher
    /// replaced or reset since it was last polled (it has not registered yet).
    pub fn rearm(&mut self) {
        self.armed = false;
    }

    /// The context to poll the gated watchers with.
    pub fn context(&self) -> Context<'_> {
        Context::from_waker(&self.waker)
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;
    use std::task::Poll;

    use super::*;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn watchers_are_polled_first_then_only_when_they_woke() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(Arc::clone(&count));
        let cx = Context::from_waker(&task);
        let notify = tokio::sync::Notify::new();
        let mut watcher = pin!(notify.notified());
        let mut gate = Gate::new();
        assert!(gate.open(&cx), "the first poll registers the watcher");
        assert!(watcher.as_mut().poll(&mut gate.context()).is_pending());
        assert!(!gate.open(&cx), "nothing fired: no poll");
        notify.notify_waiters();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the task was woken");
        assert!(gate.open(&cx), "the watcher fired: poll it");
        assert_eq!(watcher.as_mut().poll(&mut gate.context()), Poll::Ready(()));
        assert!(!gate.open(&cx));
        gate.rearm();
        assert!(gate.open(&cx), "a reset watcher is polled again");
    }
}
