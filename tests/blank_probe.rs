//! The blank decision on real filesystems: a volume whose start was wiped still holds a filesystem
//! and data further in, and is never called blank (safety rule 1). And how long the probe takes on
//! a 1 TiB sparse loop device (printed, not asserted: speed is measured, never timed in tests).

use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use caretaker::boot::probe::{Verdict, inspect};

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn verdict(path: &Path) -> Verdict {
    let mut f = File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    inspect(&mut f, size).unwrap()
}

/// Zeros over the first `mib` MiB, as a mistaken `dd if=/dev/zero of=DEV bs=1M count=N` leaves it.
fn wipe_head(path: &Path, mib: u64) {
    run(Command::new("dd").args([
        "if=/dev/zero",
        &format!("of={}", path.display()),
        "bs=1M",
        &format!("count={mib}"),
        "conv=notrunc",
        "status=none",
    ]));
}

fn image(dir: &Path, name: &str, size: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    run(Command::new("truncate").args(["-s", size]).arg(&p));
    p
}

#[test]
fn an_ext4_volume_with_its_first_mib_wiped_is_not_blank() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir(&content).unwrap();
    std::fs::write(content.join("orders.csv"), "id,total\n1,9.50\n".repeat(10_000)).unwrap();
    for size in ["1G", "3G"] {
        let img = image(dir.path(), &format!("ext4-{size}.img"), size);
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(&content).arg(&img));
        wipe_head(&img, 1);
        // Nothing at the start says "ext4" any more: blkid -p finds nothing either.
        let blkid = Command::new("blkid").args(["-p", "-o", "export"]).arg(&img).output().unwrap();
        assert!(!String::from_utf8_lossy(&blkid.stdout).contains("TYPE="), "blkid still sees it");
        assert!(matches!(verdict(&img), Verdict::NotBlank(_)), "ext4 {size} with a wiped head was called blank");
    }
}

#[test]
fn an_xfs_volume_with_its_first_mib_wiped_is_not_blank() {
    let dir = tempfile::tempdir().unwrap();
    for size in ["1G", "3G", "10737418240"] {
        let img = image(dir.path(), &format!("xfs-{size}.img"), size);
        run(Command::new("mkfs.xfs").args(["-q", "-f"]).arg(&img));
        wipe_head(&img, 1);
        assert!(matches!(verdict(&img), Verdict::NotBlank(_)), "xfs {size} with a wiped head was called blank");
        // Even with the whole first 16 MiB gone (AG 0's headers and the root inodes with it).
        wipe_head(&img, 16);
        assert!(matches!(verdict(&img), Verdict::NotBlank(_)), "xfs {size} with 16 MiB wiped was called blank");
    }
}

#[test]
fn a_never_written_one_tib_loop_device_is_blank_and_the_time_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "blank.img", "1T");
    let out = Command::new("losetup").args(["--find", "--show", "--read-only"]).arg(&img).output().unwrap();
    assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let result = std::panic::catch_unwind(|| {
        let mut f = File::open(&dev).unwrap();
        let size = std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).unwrap();
        assert_eq!(size, 1 << 40);
        let started = Instant::now();
        let v = inspect(&mut f, size).unwrap();
        println!("blank check of a 1 TiB sparse loop device ({dev}): {:?}", started.elapsed());
        v
    });
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    assert_eq!(result.unwrap(), Verdict::Blank);
}
