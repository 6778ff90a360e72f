//! Tuning of mimalloc, which the binary and the ingest bench make the global allocator.

use std::ffi::{c_int, c_long};

/// mimalloc's number for its `purge_delay` option (`mi_option_purge_delay` in `mimalloc.h`;
/// the Rust bindings do not name it). Valid for the release [`MI_VERSION`] only: the enum is
/// renumbered between releases.
const MI_OPTION_PURGE_DELAY: c_int = 15;

/// The mimalloc release (3.3.2, as `mi_version` reports it) the option number above is read
/// from.
const MI_VERSION: c_int = 30302;

/// How long memory the collector freed stays with it before mimalloc returns it to the OS.
pub const PURGE_DELAY_MS: c_long = 10_000;

/// Makes mimalloc keep freed memory for [`PURGE_DELAY_MS`] before returning it to the OS
/// (its default is 1 s); returns whether it could.
///
/// Why: the collector's working memory comes and goes in bursts (request bodies, a fold's
/// samples and sketches). Returned within a second, it was faulted in again — and zeroed, a
/// 2 MiB huge page at a time — by the next burst: 5 % of the ingest bench's samples were in
/// the kernel doing that. With purging off (`MIMALLOC_PURGE_DELAY=-1`), ack p99 at 100k
/// events/s offered was lower in all six alternating single-engine runs (SQLite 45.2 / 37.1 /
/// 30.6 ms against 304.9 / 49.7 / 195.0; PostgreSQL 50.2 / 49.0 / 60.2 against 74.3 / 56.4 /
/// 297.8); with this 10 s delay, in four of six whole-bench pairs (benches/README.md), and 10 s
/// against never made no difference. Unlike never, memory a quiet collector holds is still
/// returned, ten seconds later.
///
/// A mimalloc other than [`MI_VERSION`] is left as it is (false), since its option numbers
/// may differ; a unit test fails when `Cargo.lock` moves to one.
pub fn keep_freed_memory_longer() -> bool {
    if version() != MI_VERSION {
        return false;
    }
    // SAFETY: `mi_option_set` stores an integer option and may be called at any time from any
    // thread; the option number is mimalloc's `purge_delay` in this release (checked above),
    // for which every value is valid.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
    }
    true
}

/// The linked mimalloc's release, as major × 10,000 + minor × 100 + patch.
fn version() -> c_int {
    // SAFETY: `mi_version` takes nothing and returns a constant.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_version()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_number_is_this_mimallocs() {
        assert_eq!(
            version(),
            MI_VERSION,
            "mimalloc was updated: check `mi_option_purge_delay`'s number in its mimalloc.h \
             and update MI_OPTION_PURGE_DELAY and MI_VERSION"
        );
        assert!(keep_freed_memory_longer());
        // SAFETY: reads an integer option.
        #[allow(unsafe_code)]
        let set = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(set, PURGE_DELAY_MS);
    }
}
