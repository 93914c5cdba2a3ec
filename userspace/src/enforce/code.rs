//! The program's own pages: its code and read-only data, mapped from its binary.
//!
//! An idle Client's resident memory was almost all its binary's code (7.6 MB, of which 0.8 MB
//! anonymous: docs/benchmarks.md). The kernel maps a file's pages around each fault, 64 KiB at
//! a time, and start-up runs code spread over the whole binary (command line, configuration,
//! certificates, enrolment, the sandbox and eBPF loaders, TLS set-up), so every window of the
//! text ends up mapped and stays so while the host has memory to spare. These pages are clean
//! and file-backed: the kernel drops them under memory pressure anyway.
//!
//! [`release_program_pages`] hands them back once the Client serves; what serving runs faults
//! back in (the first query after it pays for that once, a few ms here), and the rest stays
//! out. Two steps, because the kernel lets a process reclaim a file's pages only if it owns
//! the file or may write it, and the image's Client (uid 65532) runs a binary owned by root:
//! - `MADV_PAGEOUT` reclaims the pages from the page cache, where the process owns its binary
//!   (and the kernel leaves alone pages that another process maps too);
//! - `MADV_DONTNEED` then unmaps what is left from this process. Those pages stay in the page
//!   cache, unmapped, clean and shared: the first the kernel reclaims under pressure. A
//!   private file mapping loses any private copy of a page it wrote to `MADV_DONTNEED`, so
//!   this step is taken only for segments that are read-only, in a program without text
//!   relocations, and never on a page that a writable segment shares.

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
    /// Its bytes in memory (`filesz` and, for data, the zeroed rest).
    memsz: usize,
}

/// What the program's headers say.
#[derive(Debug, Default)]
struct Program {
    /// Where it is loaded.
    base: usize,
    segments: Vec<Segment>,
    /// `DT_TEXTREL`, or `DF_TEXTREL` in `DT_FLAGS`: the loader wrote into read-only segments.
    text_relocations: bool,
}

/// `[start, end)` rounded outwards to `page`, or `None` if it would leave the address space.
fn pages(start: usize, len: usize, page: usize) -> Option<Range<usize>> {
    let end = start.checked_add(len)?.checked_add(page - 1)? / page * page;
    Some(start / page * page..end)
}

/// Page-aligned ranges of the read-only, file-backed segments at `base`: the code and the
/// read-only data, less every page that a writable segment touches (so that no advice ever
/// reaches written data, whatever the page size at run time).
fn read_only_pages(base: usize, segments: &[Segment], page: usize) -> Vec<Range<usize>> {
    // A writable segment whose pages cannot be told means no page can be trusted: none.
    let Some(writable) = segments
        .iter()
        .filter(|s| s.load && s.writable)
        .map(|s| pages(base.checked_add(s.vaddr)?, s.memsz.max(s.filesz), page))
        .collect::<Option<Vec<Range<usize>>>>()
    else {
        return Vec::new();
    };
    segments
        .iter()
        .filter(|s| s.load && !s.writable && s.filesz > 0)
        .filter_map(|s| pages(base.checked_add(s.vaddr)?, s.filesz, page))
        .map(|mut r| {
            for w in &writable {
                if w.start < r.end && r.start < w.end {
                    if w.start <= r.start {
                        r.start = r.start.max(w.end);
                    } else {
                        r.end = r.end.min(w.start);
                    }
                }
            }
            r
        })
        .filter(|r| r.start < r.end)
        .collect()
}

/// The program's headers (the first object `dl_iterate_phdr` reports is the program itself,
/// static or not).
fn program() -> Program {
    extern "C" fn first(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        /// `DT_TEXTREL`, `DT_FLAGS` and its `DF_TEXTREL` (ELF gABI).
        const DT_NULL: i64 = 0;
        const DT_TEXTREL: i64 = 22;
        const DT_FLAGS: i64 = 30;
        const DF_TEXTREL: u64 = 0x4;
        /// An `Elf64_Dyn` entry.
        #[repr(C)]
        struct Dyn {
            tag: i64,
            val: u64,
        }
        // SAFETY: glibc passes a valid `dl_phdr_info` for the duration of the call, whose
        // `dlpi_phdr` points at `dlpi_phnum` program headers of the loaded program, and whose
        // `PT_DYNAMIC` segment, when there is one, is mapped at `dlpi_addr + p_vaddr` and ends
        // with a `DT_NULL` entry; `data` is the `Program` that `program` lends for the
        // duration of `dl_iterate_phdr`.
        unsafe {
            let (info, found) = (&*info, &mut *data.cast::<Program>());
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
                    memsz: usize::try_from(h.p_memsz).unwrap_or(usize::MAX),
                })
                .collect();
            for h in headers.iter().filter(|h| h.p_type == libc::PT_DYNAMIC) {
                let addr = found
                    .base
                    .wrapping_add(usize::try_from(h.p_vaddr).unwrap_or(0));
                let mut entry = addr as *const Dyn;
                while (*entry).tag != DT_NULL {
                    let e = &*entry;
                    if e.tag == DT_TEXTREL || (e.tag == DT_FLAGS && e.val & DF_TEXTREL != 0) {
                        found.text_relocations = true;
                    }
                    entry = entry.add(1);
                }
            }
        }
        1 // the program is the first object: stop here
    }
    let mut found = Program::default();
    // SAFETY: `first` only reads what glibc hands it and writes `found`, which outlives the
    // call; returning non-zero ends the iteration.
    unsafe {
        libc::dl_iterate_phdr(Some(first), std::ptr::addr_of_mut!(found).cast());
    }
    found
}

/// The page size at run time (4 KiB if the system will not say).
fn page_size() -> usize {
    // SAFETY: sysconf takes no pointer.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}

/// Hands back the resident pages of the program's code and read-only data: reclaimed from the
/// page cache where the process may (`MADV_PAGEOUT`, Linux ≥ 5.4; the process owns its
/// binary), else unmapped from this process (`MADV_DONTNEED`). Returns the bytes of address
/// space advised. The pages stay valid: the next use faults them back in.
pub fn release_program_pages() -> io::Result<usize> {
    let page = page_size();
    let program = program();
    if program.text_relocations {
        return Err(io::Error::other(
            "the program has text relocations: its read-only pages may hold private copies",
        ));
    }
    let ranges = read_only_pages(program.base, &program.segments, page);
    if ranges.is_empty() {
        return Err(io::Error::other("the program reports no read-only segment"));
    }
    let mut advised = 0;
    for r in ranges {
        let len = r.end - r.start;
        let start = r.start as *mut libc::c_void;
        // SAFETY (both calls): the range is page-aligned and lies inside one of the program's
        // own read-only, file-backed mappings, on no page of a writable segment, in a program
        // without text relocations: its pages are the file's, never a private copy, so either
        // advice only drops what the kernel reads back unchanged from the binary.
        // Linux < 5.4 refuses MADV_PAGEOUT (EINVAL); the unmap below still runs.
        let _ = unsafe { libc::madvise(start, len, libc::MADV_PAGEOUT) };
        // SAFETY: as above.
        if unsafe { libc::madvise(start, len, libc::MADV_DONTNEED) } != 0 {
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
            memsz: filesz,
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

    /// With pages larger than the linker planned for, a read-only segment and a writable one
    /// can share a page: that page is never advised.
    #[test]
    fn a_page_that_a_writable_segment_touches_is_left_out() {
        let mut data = seg(true, true, 0x2_1000, 0x800);
        data.memsz = 0x2000; // .bss beyond the file's bytes
        let segments = [
            seg(true, false, 0x8000, 0x1_9000), // code, ending inside data's first page
            data,
            seg(true, false, 0x2_3800, 0x1_0000), // read-only after data, from inside its page
        ];
        assert_eq!(
            read_only_pages(0, &segments, 0x1_0000),
            vec![0..0x2_0000, 0x3_0000..0x4_0000]
        );
    }

    #[test]
    fn a_segment_that_would_wrap_the_address_space_is_skipped() {
        let segments = [seg(true, false, usize::MAX - 10, 100)];
        assert!(read_only_pages(0x1000, &segments, 0x1000).is_empty());
        // A writable one that cannot be placed: nothing at all is advised.
        let segments = [
            seg(true, false, 0, 0x1000),
            seg(true, true, usize::MAX - 10, 100),
        ];
        assert!(read_only_pages(0x1000, &segments, 0x1000).is_empty());
    }

    #[test]
    fn this_program_has_code_to_release_and_no_text_relocations() {
        let p = program();
        assert!(!p.text_relocations);
        assert!(p
            .segments
            .iter()
            .any(|s| s.load && !s.writable && s.filesz > 0));
        assert!(p.segments.iter().any(|s| s.load && s.writable));
    }

    /// Counts which pages of `ranges` this process has mapped, from `/proc/self/pagemap`
    /// (bit 63 of each page's entry: present), into buffers made beforehand, so that little
    /// code runs (and faults its own pages back in) between the advice and the count.
    struct Present {
        pagemap: std::fs::File,
        ranges: Vec<Range<usize>>,
        buf: Vec<u8>,
        page: usize,
    }

    impl Present {
        fn new(ranges: Vec<Range<usize>>, page: usize) -> Self {
            let most = ranges
                .iter()
                .map(|r| (r.end - r.start) / page)
                .max()
                .unwrap();
            Self {
                pagemap: std::fs::File::open("/proc/self/pagemap").unwrap(),
                ranges,
                buf: vec![0; most * 8],
                page,
            }
        }

        fn count(&mut self) -> usize {
            use std::os::unix::fs::FileExt;
            let mut present = 0;
            for r in &self.ranges {
                let n = (r.end - r.start) / self.page * 8;
                let at = (r.start / self.page * 8) as u64;
                self.pagemap.read_exact_at(&mut self.buf[..n], at).unwrap();
                present += self.buf[..n]
                    .chunks_exact(8)
                    .filter(|e| e[7] & 0x80 != 0)
                    .count();
            }
            present
        }
    }

    /// Set in the copies of this test program that [`the_programs_code_pages_leave`] runs.
    const CHILD: &str = "EWII_TEST_CODE_PAGES_CHILD";

    /// The kernel leaves alone pages that another process also maps, and the test runner runs
    /// this program several times at once: so the check runs in a copy of it (its own file,
    /// its own pages), as one test in a process of its own. As root, a second copy runs as
    /// `nobody`, a user that neither owns the copy nor may write it (as the image's Client
    /// runs a binary owned by root), where only the unmap step can act.
    #[test]
    fn the_programs_code_pages_leave() {
        if std::env::var_os(CHILD).is_some() {
            return pages_leave_and_the_program_still_runs();
        }
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("copy");
        std::fs::copy("/proc/self/exe", &copy).unwrap();
        let run = |uid: Option<u32>| {
            use std::os::unix::process::CommandExt;
            let mut cmd = std::process::Command::new(&copy);
            cmd.args([
                "--exact",
                "enforce::code::tests::the_programs_code_pages_leave",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .current_dir("/");
            if let Some(uid) = uid {
                cmd.uid(uid).gid(uid);
            }
            let out = cmd.output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "as {uid:?}: {text}");
            assert!(text.contains("1 passed"), "the copy ran no test: {text}");
            for line in text.lines().filter(|l| l.starts_with("pages mapped")) {
                eprintln!("as {uid:?}: {line}");
            }
        };
        run(None);
        // SAFETY: geteuid takes no pointer and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            run(Some(65_534));
        } else {
            assert!(
                !std::env::var("EWII_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1"),
                "not root: the copy cannot run as a user that does not own it"
            );
            eprintln!("not root: the check as a user that does not own the program is skipped");
        }
    }

    fn pages_leave_and_the_program_still_runs() {
        let page = page_size();
        let p = program();
        let mut present = Present::new(read_only_pages(p.base, &p.segments, page), page);
        let before = present.count();
        assert!(before > 0, "none of this program's code is mapped");
        let advised = release_program_pages().unwrap();
        let after = present.count();
        // What runs between the two counts (the count's own code, spread over a debug build's
        // text, 64 KiB around each fault) comes back: about 30 % here, and 42 % where only the
        // unmap acts (the pages stay cached, and each fault maps the cached ones around it).
        // The rest is unmapped.
        assert!(
            after * 5 < before * 3,
            "pages mapped: {before} before, {after} after handing back {advised} bytes"
        );
        eprintln!("pages mapped: {before} before, {after} after");
        // Data and heap are untouched, and code runs again from the binary.
        let v: Vec<u64> = (0..1000).collect();
        assert_eq!(v.iter().sum::<u64>(), 499_500);
        assert_eq!(pages(1, 1, 4096), Some(0..4096));
    }
}
