//! What every data thread runs beside its connections (the NLB's and the
//! module SDK's).

use std::time::Duration;

/// How often a data thread's own timer fires (see [`keep_a_timer_due`]).
pub const TICK: Duration = Duration::from_millis(250);

/// A timer due every [`TICK`], for ever: spawn it on each data thread's
/// runtime. tokio wakes a thread's driver (an eventfd write and one more
/// `epoll_wait`) whenever a timer is set to fire before every other timer
/// the thread holds. On a thread whose other timers were idle timeouts
/// minutes away, every connection's short deadline did that: the NLB's
/// connect and sniff deadlines (half a system call per connection, one in
/// ten of the NLB's own), the ALB's header-read deadline on a new
/// connection. With a timer always due within the tick, deadlines longer
/// than it (all the defaults) never do; the cost is four wake-ups a second.
pub async fn keep_a_timer_due() {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}
