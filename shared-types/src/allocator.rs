//! How the proxies' allocator (mimalloc) is tuned: the NLB and the ALB
//! call [`keep_freed_memory`] first thing in `main`.
//!
//! mimalloc gives memory it has freed back to the OS (`madvise`) 10 ms
//! after it went unused. A proxy frees most of what a connection held
//! when the connection ends, and takes it again for the next one a moment
//! later: under a steady load of short connections the ALB made 30-40
//! `madvise` calls and about 600 page faults a second (`perf stat`, a new
//! connection per request), each page taken back faulted in again, and
//! each `madvise` of a threaded process interrupts its other threads' cores
//! to flush their address translations. Held for [`PURGE_DELAY_MS`]
//! instead, memory in steady use stays mapped (no `madvise`, no faults in
//! the same run), and memory left over after a burst still goes back
//! within a second or two.

use std::ffi::c_long;

/// How long freed memory is kept before it is given back to the OS.
pub const PURGE_DELAY_MS: c_long = 1_000;

/// `mi_option_purge_delay` in mimalloc v2's `mi_option_t`
/// (`include/mimalloc.h`); `libmimalloc-sys` names no constant for it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets mimalloc's purge delay to [`PURGE_DELAY_MS`], unless the
/// environment chose one (`MIMALLOC_PURGE_DELAY`, which mimalloc reads
/// itself).
#[allow(unsafe_code)]
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: mimalloc's options are plain integers it reads atomically;
    // setting one is safe at any time, from any thread.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
    }
}

/// The purge delay mimalloc uses now, in milliseconds.
#[allow(unsafe_code)]
pub fn purge_delay_ms() -> c_long {
    // SAFETY: as above; reading an option is as safe as setting one.
    unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_is_the_one_set() {
        // Ours, or the one the environment chose; either way what was set
        // is what mimalloc reads back (a wrong option number would read
        // another option's value).
        keep_freed_memory();
        let want = match std::env::var("MIMALLOC_PURGE_DELAY") {
            Ok(v) => v.trim().parse().expect("MIMALLOC_PURGE_DELAY is a number"),
            Err(_) => PURGE_DELAY_MS,
        };
        assert_eq!(purge_delay_ms(), want);
    }
}
