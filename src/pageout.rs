//! Giving the kernel back the code pages start-up touched once and idle work never touches again.
//!
//! The idle daemon's resident set is mostly its own binary's code and read-only data (13 MiB of
//! 15 measured): configuration parsing, the command line, the D-Bus handshake, the SDK's client
//! set-up run once and stay mapped. Those pages are clean and file-backed, so `MADV_PAGEOUT`
//! (Linux 5.4+) drops them at no cost beyond a page fault if one is needed again; what idle work
//! uses comes straight back, and the resident set that remains is the daemon's real working set.
//! Android's app compaction does the same to idle processes' file-backed pages. Writable and
//! anonymous memory is never touched, so nothing can be lost: a pageout of clean file pages is
//! always a re-read away.

/// Fixes glibc malloc's mmap threshold at 1 MiB. glibc raises it (up to 32 MiB) each time a
/// mapped block above it is freed, so after the first part of a backup its 6 MiB parts come from
/// the heap arenas instead: they fragment and keep their peak after the job (measured, release
/// build, 1 GiB dump: the first backup peaked at 41 MiB, the third at 54 MiB, 45 MiB stayed
/// resident between them). With a fixed threshold each large block is a mapping of its own,
/// given back to the kernel when freed. Called once at start, before any thread exists.
pub fn fix_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes the allocator's tuning; called before other threads allocate.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Gives back the free pages of every malloc arena (glibc keeps a heap at its high-water mark):
/// after a job, the idle daemon's resident set returns to its working set.
pub fn release_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the kernel; any thread may call it.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Asks the kernel to reclaim the clean, read-only mappings of this process's own executable
/// (`/proc/self/exe`); returns how many bytes were advised. Pages another process also maps are
/// left alone by the kernel.
pub fn release_code_pages() -> std::io::Result<u64> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut advised = 0;
    for (start, end) in read_only_ranges(&maps, &exe.to_string_lossy()) {
        let len = end - start;
        // SAFETY: the range is a whole, read-only, file-backed mapping of this process (from
        // /proc/self/maps); MADV_PAGEOUT only drops clean pages, which the next access re-reads
        // from the file, so no memory the program relies on changes.
        let rc = unsafe { nix::libc::madvise(start as *mut nix::libc::c_void, len, nix::libc::MADV_PAGEOUT) };
        if rc == 0 {
            advised += len as u64;
        }
    }
    Ok(advised)
}

/// The (start, end) of each mapping of `path` that is neither writable nor anonymous.
fn read_only_ranges(maps: &str, path: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            // range perms offset dev inode, then the path after padding (to the line's end:
            // a replaced binary's path ends in " (deleted)").
            let mut fields = line.splitn(6, ' ');
            let range = fields.next()?;
            let perms = fields.next()?;
            let name = fields.nth(3)?.trim_start();
            if name != path || perms.as_bytes().get(1) != Some(&b'-') {
                return None;
            }
            let (s, e) = range.split_once('-')?;
            Some((usize::from_str_radix(s, 16).ok()?, usize::from_str_radix(e, 16).ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_executables_read_only_mappings() {
        let maps = "\
55d0c0000000-55d0c0200000 r--p 00000000 08:01 123 /usr/bin/caretaker
55d0c0200000-55d0c1000000 r-xp 00200000 08:01 123 /usr/bin/caretaker
55d0c1000000-55d0c1100000 r--p 01000000 08:01 123 /usr/bin/caretaker
55d0c1100000-55d0c1110000 rw-p 01100000 08:01 123 /usr/bin/caretaker
55d0c2000000-55d0c2100000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000100000 r-xp 00000000 08:01 456 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000200000-7f0000300000 r--p 00000000 08:01 124 /usr/bin/caretaker (deleted)
";
        assert_eq!(
            read_only_ranges(maps, "/usr/bin/caretaker"),
            vec![(0x55d0c0000000, 0x55d0c0200000), (0x55d0c0200000, 0x55d0c1000000), (0x55d0c1000000, 0x55d0c1100000)]
        );
    }

    #[test]
    fn the_running_test_binary_pages_out_its_code_and_keeps_running() {
        let rss_file = || {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let line = status.lines().find(|l| l.starts_with("RssFile:")).unwrap().to_string();
            line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
        };
        // Touch a good part of the binary: its read-only data and code, once.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let ranges = read_only_ranges(&maps, &exe.to_string_lossy());
        assert!(!ranges.is_empty(), "the test binary has read-only mappings");
        let mut sum = 0u64;
        for &(start, end) in &ranges {
            for page in (start..end).step_by(4096) {
                // SAFETY: a readable mapping of this process, read one byte per page.
                sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(page as *const u8) } as u64);
            }
        }
        let before = rss_file();
        let advised = release_code_pages().unwrap();
        let after = rss_file();
        assert!(advised > 0);
        assert!(after + 1024 < before, "RssFile {before} kB before, {after} kB after (touched sum {sum})");
        // Code that was paged out runs again (faulted back in from the file).
        assert_eq!(read_only_ranges("", "x"), vec![]);
    }
}
