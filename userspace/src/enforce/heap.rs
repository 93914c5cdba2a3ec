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

/// Lets glibc make at most `arenas` heap arenas (by default it gives each new thread that
/// allocates an arena of its own, up to eight per core). For the Client, one per worker thread:
/// with one worker, the audit, heap and DNS threads share the worker's arena instead of each
/// keeping freed blocks of its own after a load (Client RSS after the harness's load 11.0–11.4
/// → 10.0 MB, bulk unchanged within the noise: docs/benchmarks.md). Call it once, before the
/// threads start.
pub fn limit_arenas(arenas: usize) {
    #[cfg(target_env = "gnu")]
    {
        let arenas = libc::c_int::try_from(arenas.max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only changes an allocator parameter; it takes no pointer.
        let set = unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
        if set != 1 {
            tracing::debug!("glibc refused M_ARENA_MAX; arenas stay at its default");
        }
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = arenas;
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

/// Hands the whole pages inside `buf` back to the kernel in place (`MADV_DONTNEED`): they read
/// as zeros from now on and are resident again only once written. The bytes before the first
/// page boundary and after the last are left as they are. For a large buffer whose contents do
/// not matter between uses, such as quinn's receive buffer (`quinn::Endpoint::
/// release_receive_buffer`, an Ewii patch): freeing it and allocating a new zeroed one would
/// clear it byte by byte, and make it all resident, whenever the allocator finds a free block
/// that large in its heap. Returns the bytes handed back.
pub fn discard_pages(buf: &mut [u8]) -> usize {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf takes no pointer.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let start = buf.as_mut_ptr();
        let skip = start.align_offset(page).min(buf.len());
        let len = (buf.len() - skip) / page * page;
        if len == 0 {
            return 0;
        }
        // SAFETY: the range is whole pages inside `buf`, which this call borrows exclusively:
        // nothing else reads or writes it meanwhile, and MADV_DONTNEED on private anonymous
        // memory only replaces its bytes with zeros (as a write of zeros through `buf` would).
        let done = unsafe { libc::madvise(start.add(skip).cast(), len, libc::MADV_DONTNEED) };
        if done == 0 {
            return len;
        }
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "the buffer's pages stay resident"
        );
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
    0
}

/// What the thread of [`tune_for_bulk`] does with the program's own code pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramPages {
    /// Leaves them to the kernel.
    Keep,
    /// Once the first session is up (start-up is over), hands them back
    /// ([`super::code::release_program_pages`]: reclaimed where the process owns its binary,
    /// else unmapped): what serving runs faults back in. The Client, whose idle memory was
    /// mostly start-up code.
    ReleaseOnceServing,
}

/// For a process that moves bulk data: [`keep_freed_heap`], and a thread that calls
/// [`release_freed_heap`] once the work has stopped — when the count of ended queries in
/// `audit`'s metrics, with its count of quiet spells on queries held open
/// (`Metrics::count_quiet_spell`), moved since the last release and then stayed still for one
/// [`QUIET_TICK`] — and that handles the program's code pages as `code` says, at its first
/// tick after `audit` counted a session up. The thread ends with the last handle on those
/// metrics.
pub fn tune_for_bulk(audit: &Audit, code: ProgramPages) -> std::io::Result<()> {
    keep_freed_heap();
    let metrics: Weak<Metrics> = Arc::downgrade(audit.metrics());
    let mut quiet = Quiet::default();
    let mut code_pending = code == ProgramPages::ReleaseOnceServing;
    std::thread::Builder::new()
        .name("ewii-heap".into())
        .spawn(move || loop {
            std::thread::sleep(QUIET_TICK);
            let Some((ended, sessions)) = metrics
                .upgrade()
                .map(|m| (m.queries_ended() + m.quiet_spells(), m.sessions_up()))
            else {
                return;
            };
            if quiet.tick(ended) {
                release_freed_heap();
            }
            if code_pending && sessions > 0 {
                code_pending = false;
                match super::code::release_program_pages() {
                    Ok(bytes) => tracing::debug!(
                        kib = bytes / 1024,
                        "start-up over: the program's code and read-only pages handed back"
                    ),
                    Err(e) => tracing::debug!(
                        error = %e,
                        "the program's code pages stay mapped"
                    ),
                }
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

    /// The arenas glibc has made in this process (`malloc_info`'s `<heap>` elements).
    #[cfg(target_env = "gnu")]
    fn arenas() -> usize {
        let dir = tempfile::tempdir().unwrap();
        let path = std::ffi::CString::new(dir.path().join("info.xml").to_str().unwrap()).unwrap();
        // SAFETY: a FILE opened here, written by malloc_info and closed before it is read.
        unsafe {
            let file = libc::fopen(path.as_ptr(), c"w".as_ptr());
            assert!(!file.is_null());
            assert_eq!(libc::malloc_info(0, file), 0);
            libc::fclose(file);
        }
        let xml = std::fs::read_to_string(dir.path().join("info.xml")).unwrap();
        xml.matches("<heap nr=").count()
    }

    #[cfg(target_env = "gnu")]
    #[test]
    fn new_threads_make_no_arena_past_the_limit() {
        limit_arenas(1);
        let before = arenas();
        let start = Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let start = start.clone();
                std::thread::spawn(move || {
                    start.wait();
                    let held: Vec<Vec<u8>> = (0..64).map(|i| vec![1; 1024 + i]).collect();
                    start.wait();
                    held.len()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 64);
        }
        assert!(before >= 1);
        assert_eq!(arenas(), before, "four new threads, no new arena");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn discarded_pages_read_as_zeros_and_the_bytes_around_them_are_kept() {
        const PAGE: usize = 4096;
        let mut buf = vec![0xabu8; 64 * PAGE + 100];
        // A slice that starts and ends inside a page.
        let inner = &mut buf[10..64 * PAGE + 90];
        let skip = inner.as_ptr().align_offset(PAGE);
        let handed_back = discard_pages(inner);
        assert!(handed_back >= 62 * PAGE, "{handed_back} bytes");
        assert_eq!(handed_back % PAGE, 0);
        let inner = &buf[10..64 * PAGE + 90];
        assert!(
            inner[..skip].iter().all(|&b| b == 0xab),
            "before the first page"
        );
        assert!(
            inner[skip..skip + handed_back].iter().all(|&b| b == 0),
            "the whole pages read as zeros"
        );
        assert!(
            inner[skip + handed_back..].iter().all(|&b| b == 0xab),
            "after the last page"
        );
        assert!(buf[..10]
            .iter()
            .chain(&buf[64 * PAGE + 90..])
            .all(|&b| b == 0xab));
        assert_eq!(discard_pages(&mut buf[1..100]), 0, "no whole page: nothing");
    }

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
