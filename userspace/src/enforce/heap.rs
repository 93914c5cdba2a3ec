//! The process's own heap: how glibc's allocator keeps and returns freed memory.
//!
//! Under bulk load quinn holds every sent chunk until the peer acknowledges it, then frees
//! them in runs; with glibc's default trim threshold (128 KiB) each run shrank an arena's top
//! with `madvise`, and the next allocations faulted the same pages back in: 6 % of the Hub's
//! and the Client's CPU in a bulk profile (docs/benchmarks.md). [`keep_freed_heap`] lets each
//! arena keep up to [`KEEP`] at its top while the process is busy, and [`tune_for_bulk`] also
//! gives all of it back once the work stops, so that memory after a load returns to what it
//! was. Only glibc builds have these calls; elsewhere both are no-ops.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::audit::{Audit, Metrics};

/// Free memory an arena keeps at its top instead of returning it at once.
pub const KEEP: usize = 8 * 1024 * 1024;
/// How often [`tune_for_bulk`]'s thread looks at the activity counter.
pub const QUIET_TICK: Duration = Duration::from_millis(250);

/// Sets glibc's trim threshold to [`KEEP`]. Call it once, early, before the threads start.
pub fn keep_freed_heap() {
    #[cfg(target_env = "gnu")]
    {
        #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
        const KEEP_C: libc::c_int = KEEP as libc::c_int;
        // SAFETY: mallopt only changes an allocator parameter; it takes no pointer.
        let set = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP_C) };
        if set != 1 {
            tracing::debug!("glibc refused M_TRIM_THRESHOLD; freed heap is trimmed at once");
        }
    }
}

/// Returns the free memory of every arena (its top, and whole free pages inside) to the kernel.
pub fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory of glibc's heaps to the kernel; it takes no
    // pointer and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// For a process that moves bulk data: [`keep_freed_heap`], and a thread that calls
/// [`release_freed_heap`] once the work has stopped — when the count of ended queries in
/// `audit`'s metrics moved since the last release and then stayed still for one
/// [`QUIET_TICK`]. The thread ends with the last handle on those metrics.
pub fn tune_for_bulk(audit: &Audit) -> std::io::Result<()> {
    keep_freed_heap();
    let metrics: Weak<Metrics> = Arc::downgrade(audit.metrics());
    let mut quiet = Quiet::default();
    std::thread::Builder::new()
        .name("ewii-heap".into())
        .spawn(move || loop {
            std::thread::sleep(QUIET_TICK);
            let Some(ended) = metrics.upgrade().map(|m| m.queries_ended()) else {
                return;
            };
            if quiet.tick(ended) {
                release_freed_heap();
            }
        })
        .map(drop)
}

/// When to release: the work count moved since the last release, then stood still a tick.
#[derive(Debug, Default)]
struct Quiet {
    last: Option<u64>,
    released_at: Option<u64>,
}

impl Quiet {
    /// Takes the count at this tick; true when the heap should be released now.
    fn tick(&mut self, now: u64) -> bool {
        let release = self.last == Some(now) && self.released_at != Some(now);
        if release {
            self.released_at = Some(now);
        }
        self.last = Some(now);
        release
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_once_after_work_stops_and_never_while_it_goes_on() {
        let mut q = Quiet::default();
        // Start: idle from the first tick, nothing to give back yet... once.
        assert!(!q.tick(0));
        assert!(q.tick(0), "quiet since start: released once");
        assert!(!q.tick(0), "and not again while nothing happens");
        // Busy: the count moves at every tick.
        for n in 1..5 {
            assert!(!q.tick(n), "never while queries keep ending");
        }
        assert!(q.tick(4), "the first still tick after the load releases");
        assert!(!q.tick(4));
        assert!(!q.tick(4));
        assert!(!q.tick(7));
        assert!(q.tick(7));
    }
}
