//! How the proxies' allocator (mimalloc) is tuned: the NLB and the ALB
//! call [`keep_freed_memory`] first thing in `main`, before any other
//! thread starts.
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
//! the same run). What a burst took still goes back once it has gone
//! unused that long (memory mimalloc has handed back to its arenas, ten
//! times that long), at the allocator's next frees: an idle process keeps
//! what it holds.

use std::ffi::c_long;

/// How long freed memory is kept before it is given back to the OS.
pub const PURGE_DELAY_MS: c_long = 1_000;

/// `mi_option_purge_delay` in mimalloc v2's `mi_option_t`
/// (`include/mimalloc.h`); `libmimalloc-sys` names no constant for it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets mimalloc's purge delay to [`PURGE_DELAY_MS`], unless the
/// environment chose one: `MIMALLOC_PURGE_DELAY`, or its older name
/// `MIMALLOC_RESET_DELAY`, in any case (as mimalloc reads them). Call it
/// before any other thread starts.
#[allow(unsafe_code)]
pub fn keep_freed_memory() {
    if std::env::vars_os().any(|(name, _)| chosen_by_environment(&name)) {
        return;
    }
    // SAFETY: the call has no precondition of its own; mimalloc's options
    // are plain fields, written here and read by its other calls, so this
    // runs before any other thread can allocate (the callers make it the
    // first thing in `main`).
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
    }
}

/// Whether `name` is an environment variable that sets mimalloc's purge
/// delay.
fn chosen_by_environment(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|n| {
        n.eq_ignore_ascii_case("MIMALLOC_PURGE_DELAY")
            || n.eq_ignore_ascii_case("MIMALLOC_RESET_DELAY")
    })
}

/// The purge delay mimalloc uses now, in milliseconds.
#[allow(unsafe_code)]
pub fn purge_delay_ms() -> c_long {
    // SAFETY: no precondition; a read of the option that the setting
    // above, made before other threads start, does not race with.
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
        let chosen = std::env::vars_os().find(|(name, _)| chosen_by_environment(name));
        let want = match chosen {
            Some((_, v)) => v
                .to_str()
                .and_then(|v| v.trim().parse().ok())
                .expect("the purge delay in the environment is a number"),
            None => PURGE_DELAY_MS,
        };
        assert_eq!(purge_delay_ms(), want);
    }

    #[test]
    fn both_names_of_the_setting_count_in_any_case() {
        for name in [
            "MIMALLOC_PURGE_DELAY",
            "mimalloc_purge_delay",
            "MIMALLOC_RESET_DELAY",
            "Mimalloc_Reset_Delay",
        ] {
            assert!(chosen_by_environment(name.as_ref()), "{name}");
        }
        for name in [
            "MIMALLOC_PURGE_DECOMMITS",
            "PURGE_DELAY",
            "MIMALLOC_PURGE_DELAY_X",
        ] {
            assert!(!chosen_by_environment(name.as_ref()), "{name}");
        }
    }
}
