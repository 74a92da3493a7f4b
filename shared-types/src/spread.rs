//! Spreading connections over data threads (the NLB's and the module SDK's).
//!
//! Every data thread accepts from the one listening socket, and whichever
//! thread is running when connections arrive takes all that are queued. A
//! client that opens its connections at once (a connection pool, the NLB
//! under a burst, a load generator) can so land every connection on one
//! thread, and long-lived connections then keep the other cores idle for
//! their whole life: measured with 64 keep-alive connections on two data
//! threads, one thread served all 64.
//!
//! So each thread counts the live connections it serves, and a thread
//! holding clearly more than another passes a newly accepted connection to
//! it instead of serving it. "Clearly more" leaves room for the ordinary
//! jitter of short connections (see [`Spread::place`]), so a balanced load
//! hands nothing over; each thread looks at one other thread per accept
//! (in turn), which keeps the cost of a placement constant however many
//! threads there are, and still evens the load out (the power of two
//! choices).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A counter on its own cache line: each thread writes its own and reads
/// the others', and they must not share a line.
#[repr(align(64))]
#[derive(Default)]
struct Slot(AtomicUsize);

/// Live connections per data thread.
pub struct Spread {
    load: Box<[Slot]>,
}

thread_local! {
    /// The next thread this one compares itself with (an offset from it).
    static TURN: Cell<usize> = const { Cell::new(0) };
}

impl Spread {
    pub fn new(threads: usize) -> Arc<Self> {
        Arc::new(Spread {
            load: (0..threads.max(1)).map(|_| Slot::default()).collect(),
        })
    }

    /// The threads spread over.
    pub fn threads(&self) -> usize {
        self.load.len()
    }

    /// Live connections on `thread`.
    pub fn load(&self, thread: usize) -> usize {
        self.load
            .get(thread)
            .map_or(0, |s| s.0.load(Ordering::Relaxed))
    }

    /// Where a connection accepted on thread `me` is served, counted there
    /// until the returned guard drops: on `me`, unless the thread it looks
    /// at this turn has at least 4 and an eighth fewer connections (an
    /// eighth of that thread's count): against 32, at least 8 fewer. The
    /// jitter of short connections mostly stays under that (with 8 short
    /// connections a thread, a slack of 2 handed over one connection in
    /// four, each costing a wake-up, and in the module SDK two `epoll_ctl`
    /// calls too); a burst on
    /// one thread ends within it (35 against 29 for 64 connections on two
    /// threads).
    pub fn place(self: &Arc<Self>, me: usize) -> Placed {
        let n = self.threads();
        let me = me.min(n - 1);
        let mut thread = me;
        if n > 1 {
            let offset = TURN.with(|t| {
                let o = t.get() % (n - 1) + 1;
                t.set(o);
                o
            });
            let other = (me + offset) % n;
            let theirs = self.load(other);
            if self.load(me) > theirs + 3 + theirs / 8 {
                thread = other;
            }
        }
        self.on(thread)
    }

    /// Counts a connection on `thread`, whatever the others hold.
    pub fn on(self: &Arc<Self>, thread: usize) -> Placed {
        let thread = thread.min(self.threads() - 1);
        self.load[thread].0.fetch_add(1, Ordering::Relaxed);
        Placed {
            spread: self.clone(),
            thread,
        }
    }
}

/// One connection counted on one thread.
pub struct Placed {
    spread: Arc<Spread>,
    thread: usize,
}

impl Placed {
    pub fn thread(&self) -> usize {
        self.thread
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.spread.load[self.thread]
            .0
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_on_one_thread_ends_even() {
        let spread = Spread::new(2);
        // Thread 0 accepts all 64: it keeps about half.
        let held: Vec<Placed> = (0..64).map(|_| spread.place(0)).collect();
        let on0 = held.iter().filter(|p| p.thread() == 0).count();
        assert_eq!(on0 + spread.load(1), 64);
        assert!((32..=36).contains(&on0), "thread 0 kept {on0} of 64");
        assert_eq!(spread.load(0), on0);
        drop(held);
        assert_eq!((spread.load(0), spread.load(1)), (0, 0));
    }

    #[test]
    fn a_balanced_load_hands_nothing_over() {
        let spread = Spread::new(2);
        let _theirs: Vec<Placed> = (0..30).map(|_| spread.on(1)).collect();
        let mine: Vec<Placed> = (0..30).map(|_| spread.on(0)).collect();
        // Jitter within the slack: 37 against 30 stays.
        let more: Vec<Placed> = (0..7).map(|_| spread.place(0)).collect();
        assert!(more.iter().all(|p| p.thread() == 0));
        // Past it, the next one goes.
        assert_eq!(spread.place(0).thread(), 1);
        drop((mine, more));
    }

    #[test]
    fn many_threads_are_evened_out_by_looking_at_one_a_turn() {
        let spread = Spread::new(8);
        let held: Vec<Placed> = (0..800).map(|_| spread.place(3)).collect();
        for t in 0..8 {
            let n = spread.load(t);
            assert!((70..=130).contains(&n), "thread {t} holds {n} of 800");
        }
        assert_eq!(held.len(), (0..8).map(|t| spread.load(t)).sum::<usize>());
    }

    #[test]
    fn one_thread_keeps_everything() {
        let spread = Spread::new(1);
        let held: Vec<Placed> = (0..10).map(|_| spread.place(0)).collect();
        assert!(held.iter().all(|p| p.thread() == 0));
        assert_eq!(spread.load(0), 10);
    }
}
