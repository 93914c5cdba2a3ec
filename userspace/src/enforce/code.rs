//! The program's own pages: its code and read-only data, mapped from its binary.
//!
//! An idle Client's resident memory was almost all its binary's code (7.6 MB, of which 0.8 MB
//! anonymous: docs/benchmarks.md). The kernel maps a file's pages around each fault, 64 KiB at
//! a time, and start-up runs code spread over the whole binary (command line, configuration,
//! certificates, enrolment, the sandbox and eBPF loaders, TLS set-up), so every window of the
//! text ends up mapped and stays so while the host has memory to spare. These pages are clean
//! and file-backed: the kernel drops them under memory pressure anyway.
//! [`release_program_pages`] asks for that now (`MADV_PAGEOUT`), once the Client serves; what
//! serving runs faults back in (the first query after it pays for that once, ~2 ms here), and
//! the rest stays out. Pages that another process also maps (a second Client of the same
//! image) are left alone by the kernel.

use std::io;
use std::ops::Range;

/// One loaded segment of the program, from its program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    /// `PT_LOAD`.
    load: bool,
    /// `PF_W`: data the program writes (or relocated, then made read-only: RELRO), not pages
    /// the kernel can drop and read back from the binary.
    writable: bool,
    /// Its address, relative to where the program was loaded.
    vaddr: usize,
    /// Its bytes backed by the file.
    filesz: usize,
}

/// Page-aligned ranges of the read-only, file-backed segments at `base`: the code and the
/// read-only data. Segments with different permissions never share a page, so rounding each
/// outwards to `page` stays inside the segment's own mapping.
fn read_only_pages(base: usize, segments: &[Segment], page: usize) -> Vec<Range<usize>> {
    segments
        .iter()
        .filter(|s| s.load && !s.writable && s.filesz > 0)
        .filter_map(|s| {
            let start = base.checked_add(s.vaddr)?;
            let end = start.checked_add(s.filesz)?;
            let end = end.checked_add(page - 1)? / page * page;
            Some(start / page * page..end)
        })
        .collect()
}

/// Where the program is loaded, and its segments (the first object `dl_iterate_phdr` reports
/// is the program itself, static or not).
fn program_segments() -> (usize, Vec<Segment>) {
    struct Found {
        base: usize,
        segments: Vec<Segment>,
    }
    extern "C" fn first(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: glibc passes a valid `dl_phdr_info` for the duration of the call, whose
        // `dlpi_phdr` points at `dlpi_phnum` program headers; `data` is the `Found` that
        // `program_segments` lends for the duration of `dl_iterate_phdr`.
        unsafe {
            let (info, found) = (&*info, &mut *data.cast::<Found>());
            found.base = usize::try_from(info.dlpi_addr).unwrap_or(0);
            let headers = if info.dlpi_phdr.is_null() {
                &[][..]
            } else {
                std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum))
            };
            found.segments = headers
                .iter()
                .map(|h| Segment {
                    load: h.p_type == libc::PT_LOAD,
                    writable: h.p_flags & libc::PF_W != 0,
                    vaddr: usize::try_from(h.p_vaddr).unwrap_or(usize::MAX),
                    filesz: usize::try_from(h.p_filesz).unwrap_or(0),
                })
                .collect();
        }
        1 // the program is the first object: stop here
    }
    let mut found = Found {
        base: 0,
        segments: Vec::new(),
    };
    // SAFETY: `first` only reads what glibc hands it and writes `found`, which outlives the
    // call; returning non-zero ends the iteration.
    unsafe {
        libc::dl_iterate_phdr(Some(first), std::ptr::addr_of_mut!(found).cast());
    }
    (found.base, found.segments)
}

/// Asks the kernel to reclaim, now, the resident pages of the program's code and read-only
/// data (`MADV_PAGEOUT`, Linux ≥ 5.4). Returns the bytes of address space advised. The pages
/// stay valid: the next use faults them back in from the binary.
pub fn release_program_pages() -> io::Result<usize> {
    // SAFETY: sysconf takes no pointer.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096);
    let (base, segments) = program_segments();
    let ranges = read_only_pages(base, &segments, page);
    if ranges.is_empty() {
        return Err(io::Error::other("the program reports no read-only segment"));
    }
    let mut advised = 0;
    for r in ranges {
        let len = r.end - r.start;
        // SAFETY: the range is page-aligned and lies inside one of the program's own
        // read-only, file-backed mappings; MADV_PAGEOUT only drops pages the kernel can read
        // back from the file, so no memory the program relies on changes.
        let done = unsafe { libc::madvise(r.start as *mut libc::c_void, len, libc::MADV_PAGEOUT) };
        if done != 0 {
            return Err(io::Error::last_os_error());
        }
        advised += len;
    }
    Ok(advised)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(load: bool, writable: bool, vaddr: usize, filesz: usize) -> Segment {
        Segment {
            load,
            writable,
            vaddr,
            filesz,
        }
    }

    #[test]
    fn only_read_only_loaded_segments_count_rounded_to_their_pages() {
        let segments = [
            seg(false, false, 0x40, 0x2d8),       // PT_PHDR
            seg(true, false, 0, 0x1_2345),        // headers, read-only data
            seg(true, false, 0x1_3345, 0x5_0000), // code, starting mid-page
            seg(true, true, 0x6_4000, 0x3000),    // RELRO and data
            seg(true, false, 0x7_0000, 0),        // nothing from the file
        ];
        assert_eq!(
            read_only_pages(0x7f00_0000_0000, &segments, 0x1000),
            vec![
                0x7f00_0000_0000..0x7f00_0001_3000,
                0x7f00_0001_3000..0x7f00_0006_4000,
            ]
        );
    }

    #[test]
    fn a_segment_that_would_wrap_the_address_space_is_skipped() {
        let segments = [seg(true, false, usize::MAX - 10, 100)];
        assert!(read_only_pages(0x1000, &segments, 0x1000).is_empty());
    }

    /// The resident kB of this test program's executable mappings (its code).
    fn code_resident_kb() -> u64 {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_str().unwrap();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let (mut in_code, mut kb) = (false, 0);
        for line in smaps.lines() {
            if let Some(first) = line.split_whitespace().next() {
                if first.contains('-') && !first.ends_with(':') {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    in_code = fields.get(1).is_some_and(|p| p.contains('x'))
                        && fields.last() == Some(&exe);
                    continue;
                }
            }
            if in_code {
                if let Some(v) = line.strip_prefix("Rss:") {
                    kb += v.trim().trim_end_matches(" kB").parse::<u64>().unwrap();
                }
            }
        }
        kb
    }

    /// Set in the copy of this test program that [`the_programs_code_pages_leave`] runs.
    const CHILD: &str = "EWII_TEST_CODE_PAGES_CHILD";

    /// Pages that another process also maps are left alone by the kernel, and the test runner
    /// runs this program several times at once: so the check runs in a copy of it (its own
    /// file, its own pages), as one test in a process of its own.
    #[test]
    fn the_programs_code_pages_leave() {
        if std::env::var_os(CHILD).is_some() {
            return pages_leave_and_the_program_still_runs();
        }
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("copy");
        std::fs::copy("/proc/self/exe", &copy).unwrap();
        let name = "enforce::code::tests::the_programs_code_pages_leave";
        let out = std::process::Command::new(&copy)
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "the copy ran no test: {text}");
    }

    fn pages_leave_and_the_program_still_runs() {
        let before = code_resident_kb();
        assert!(before > 0, "this test's code is not resident at all");
        let advised = release_program_pages().unwrap();
        let after = code_resident_kb();
        // What this thread ran between the two reads faults back in, and the kernel keeps a
        // large folio that is only partly mapped here (50-70 % of the pages left in runs on
        // this machine); at least a quarter must go.
        assert!(
            after * 4 < before * 3,
            "code resident {before} kB before, {after} kB after MADV_PAGEOUT of {advised} bytes"
        );
        // Data and heap are untouched, and code runs again from the binary.
        let v: Vec<u64> = (0..1000).collect();
        assert_eq!(v.iter().sum::<u64>(), 499_500);
        assert_eq!(
            read_only_pages(0, &[seg(true, false, 0, 1)], 4096),
            vec![0..4096]
        );
    }
}
