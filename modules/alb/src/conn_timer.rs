//! One timer per HTTP/1 connection for the deadlines its requests set one
//! after another: the request head's (`header_read_timeout_ms`), and the
//! upstream answer's (`request_timeout_ms`).
//!
//! tokio makes a timer costly to create and to drop (each takes the timer
//! driver's lock and touches its wheel) and cheap to move later (the wheel
//! entry stays where it is and is moved when it comes due).
//! `tokio::time::timeout` makes one for every request: a few hundred
//! instructions each, per keep-alive request.
//! A [`ConnTimer`] keeps one tokio sleep for the connection and moves it to
//! each new deadline; the deadlines and what happens when one passes are
//! the same as before.
//!
//! One deadline at a time, polled from one task: an HTTP/1 connection reads
//! one request head at a time and has one request in flight at a time, all
//! on the connection's task. (HTTP/2 runs each request on a task of its
//! own, so its requests keep a timer each.)

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::time::{Instant, Sleep};

/// One reusable timer (see the module's documentation).
#[derive(Default)]
pub struct ConnTimer {
    inner: parking_lot::Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Made on first use: a connection that never waits makes none.
    sleep: Option<Pin<Box<Sleep>>>,
    /// The waker the sleep was last polled with, while it is registered.
    waker: Option<Waker>,
}

impl ConnTimer {
    /// Ready once `deadline` has passed.
    pub fn poll_until(&self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let mut inner = self.inner.lock();
        let Inner { sleep, waker } = &mut *inner;
        let same_waker = waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        let sleep = match sleep {
            Some(sleep) => {
                // Set for this deadline or an earlier one, not passed yet,
                // and waking this task: nothing to do. (If it was set
                // earlier, the task is woken then, and the sleep moved on
                // to `deadline` below.)
                if same_waker && sleep.deadline() <= deadline && !sleep.is_elapsed() {
                    return Poll::Pending;
                }
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                sleep
            }
            None => sleep.insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        // With budget left, a pending poll has registered this task's waker
        // (without, tokio only asked the task to yield).
        let registers = tokio::task::coop::has_budget_remaining();
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                *waker = None;
                Poll::Ready(())
            }
            Poll::Pending => {
                if !registers {
                    *waker = None;
                } else if !same_waker {
                    *waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// `fut`, or `Err(())` once `deadline` passed on `timer`.
    async fn timeout_at<F: Future>(
        timer: &ConnTimer,
        deadline: Instant,
        fut: F,
    ) -> Result<F::Output, ()> {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(v));
            }
            timer.poll_until(deadline, cx).map(|()| Err(()))
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_passes_at_its_time_after_the_timer_moved() {
        let timer = ConnTimer::default();
        let start = Instant::now();
        // A first deadline, then a later one on the same timer.
        let first = timeout_at(&timer, start + Duration::from_secs(5), async {}).await;
        assert_eq!(first, Ok(()));
        let second = timeout_at(
            &timer,
            start + Duration::from_secs(10),
            std::future::pending::<()>(),
        )
        .await;
        assert_eq!(second, Err(()));
        assert_eq!(Instant::now(), start + Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_than_the_last_one_still_passes_in_time() {
        let timer = ConnTimer::default();
        let start = Instant::now();
        let _ = timeout_at(&timer, start + Duration::from_secs(30), async {}).await;
        let r = timeout_at(
            &timer,
            start + Duration::from_secs(2),
            std::future::pending::<()>(),
        )
        .await;
        assert_eq!(r, Err(()));
        assert_eq!(Instant::now(), start + Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_after_one_that_passed_passes_too() {
        let timer = ConnTimer::default();
        let start = Instant::now();
        let r = timeout_at(
            &timer,
            start + Duration::from_secs(1),
            std::future::pending::<()>(),
        )
        .await;
        assert_eq!(r, Err(()));
        let r = timeout_at(
            &timer,
            start + Duration::from_secs(3),
            std::future::pending::<()>(),
        )
        .await;
        assert_eq!(r, Err(()));
        assert_eq!(Instant::now(), start + Duration::from_secs(3));
    }
}
