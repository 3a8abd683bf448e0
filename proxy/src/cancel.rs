//! Waiting for a cancellation beside a relay, without touching the token on every wake-up.
//!
//! A relay's task selects over the relay and the tokens that can end it (the pod stopped, a
//! policy revoked the connection, the client's certificate expired). `tokio::select!` polls
//! every branch whenever the task wakes, and polling a token's `cancelled()` future takes
//! the lock of its waiter list each time (so does `is_cancelled`): on the destination side,
//! four locks per chunk relayed, three in the relay's select and one in the stream task's
//! (callgrind, 2026-12-05: `poll_notified` and
//! `WaitForCancellationFuture::poll` ~5% of the agents' user-space instructions per round
//! trip). [`Cancelled`] gives the token's future a waker of its own, which records that the
//! token woke it and then wakes the task; the future is polled again only then (or for a new
//! task waker), so a wake-up by the relay's sockets costs one atomic load per token.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

pin_project_lite::pin_project! {
    /// Resolves once `token` is cancelled, like `token.cancelled()`.
    pub struct Cancelled<'a> {
        #[pin]
        wait: WaitForCancellationFuture<'a>,
        flag: Arc<Flag>,
        // The task waker `flag` wakes; `None` before the first poll.
        task: Option<Waker>,
    }
}

/// The waker the token's future holds.
#[derive(Default)]
struct Flag {
    /// The token's future was woken and not polled since.
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(w) = &*self.task.lock().unwrap_or_else(|p| p.into_inner()) {
            w.wake_by_ref();
        }
    }
}

impl<'a> Cancelled<'a> {
    pub fn new(token: &'a CancellationToken) -> Self {
        Self {
            wait: token.cancelled(),
            flag: Arc::default(),
            task: None,
        }
    }
}

impl Future for Cancelled<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let same = this.task.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if same && !this.flag.woken.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        if !same {
            *this.flag.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
            *this.task = Some(cx.waker().clone());
        }
        // Cleared before the poll: a wake-up during it sets the flag again.
        this.flag.woken.store(false, Ordering::Release);
        let waker = Waker::from(this.flag.clone());
        this.wait.poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(c: &mut Pin<&mut Cancelled<'_>>, w: &Arc<Count>) -> Poll<()> {
        let waker = Waker::from(w.clone());
        c.as_mut().poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn the_last_waker_is_woken_and_the_wait_ends_when_the_token_fires() {
        let token = CancellationToken::new();
        let mut c = std::pin::pin!(Cancelled::new(&token));
        let (first, second) = (Arc::new(Count::default()), Arc::new(Count::default()));
        assert!(poll(&mut c, &first).is_pending());
        assert!(
            poll(&mut c, &first).is_pending(),
            "polled again, same waker"
        );
        // The task moved on to another waker: the wait must hold that one now.
        assert!(poll(&mut c, &second).is_pending());
        token.cancel();
        assert_eq!(
            second.0.load(Ordering::SeqCst),
            1,
            "the current waker was not woken"
        );
        assert!(poll(&mut c, &second).is_ready());
    }

    #[test]
    fn a_token_cancelled_already_or_through_its_parent_ends_the_wait() {
        let token = CancellationToken::new();
        token.cancel();
        let w = Arc::new(Count::default());
        assert!(poll(&mut std::pin::pin!(Cancelled::new(&token)), &w).is_ready());
        let parent = CancellationToken::new();
        let child = parent.child_token();
        let mut c = std::pin::pin!(Cancelled::new(&child));
        assert!(poll(&mut c, &w).is_pending());
        parent.cancel();
        assert_eq!(w.0.load(Ordering::SeqCst), 1);
        assert!(poll(&mut c, &w).is_ready());
    }

    #[tokio::test]
    async fn a_relay_beside_it_ends_when_the_token_fires() {
        let token = CancellationToken::new();
        let fire = token.clone();
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            fire.cancel();
        });
        let never = std::future::pending::<()>();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            tokio::select! {
                _ = never => false,
                _ = Cancelled::new(&token) => true,
            }
        })
        .await;
        assert_eq!(ended, Ok(true), "the select did not see the cancellation");
    }
}
