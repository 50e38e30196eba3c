//! CPU priority for caretaker's heavy work (`[jobs] nice`): on the real box's one vCPU, what a
//! backup burns the API's queries lose, so the processes a backup keeps busy yield under
//! contention and run at full speed otherwise. Nice values are per process (per thread on Linux)
//! and only ever raised here (lower priority), never lowered.

/// The nice value of process `pid` (the kernel's view, 0 when it cannot be read).
pub fn nice_of(pid: u32) -> std::io::Result<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // pid (comm) state … : comm may hold spaces and parentheses; fields resume after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    rest.split_whitespace()
        .nth(16)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no nice value in /proc/{pid}/stat")))
}

/// Sets process `pid`'s nice value to `nice`, if that lowers its priority (another user's
/// process needs CAP_SYS_NICE).
pub fn lower(pid: u32, nice: i32) -> std::io::Result<()> {
    if nice_of(pid)? >= nice {
        return Ok(());
    }
    // SAFETY: setpriority has no memory effects; `pid` names one process.
    let rc = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS as _, pid as _, nice) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Sets the nice value of this process's autogroup (`/proc/self/autogroup`): where the kernel
/// shares the CPU between sessions (tasks outside any cpu cgroup, with
/// `kernel.sched_autogroup_enabled`), a process's own nice value only ranks it among its session,
/// and the session's weight is this one. Ok(false) when the kernel has no autogroups.
///
/// The kernel allows one such change per 100 ms on the whole machine to processes without
/// CAP_SYS_ADMIN (`EAGAIN` otherwise, e.g. while other daemons start beside this one): it is
/// retried for up to 5 s.
pub async fn set_autogroup_nice(nice: i32) -> std::io::Result<bool> {
    let path = "/proc/self/autogroup";
    let mut attempts = 0;
    loop {
        let result = std::fs::OpenOptions::new().write(true).open(path).and_then(|mut f| {
            use std::io::Write;
            f.write_all(nice.to_string().as_bytes())
        });
        match result {
            Ok(()) => return Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) if e.raw_os_error() == Some(nix::libc::EAGAIN) && attempts < 40 => {
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(125)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// This process's autogroup nice value, if the kernel has autogroups (`/autogroup-N nice K`).
pub fn autogroup_nice() -> Option<i32> {
    let text = std::fs::read_to_string("/proc/self/autogroup").ok()?;
    text.split_whitespace().nth(2)?.parse().ok()
}

/// Makes the child `cmd` starts run at nice `nice` from its first instruction (set in the child
/// after fork, as its own user: raising one's own nice value needs no privilege).
pub fn child_at(cmd: &mut tokio::process::Command, nice: i32) {
    if nice <= 0 {
        return;
    }
    // SAFETY: the closure runs between fork and exec and calls only setpriority, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::setpriority(nix::libc::PRIO_PROCESS as _, 0, nice) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_child_starts_niced_and_a_running_process_is_lowered_never_raised() {
        let mut cmd = tokio::process::Command::new("sleep");
        cmd.arg("5").kill_on_drop(true);
        child_at(&mut cmd, 7);
        let child = cmd.spawn().unwrap();
        let pid = child.id().unwrap();
        assert_eq!(nice_of(pid).unwrap(), 7);
        lower(pid, 12).unwrap();
        assert_eq!(nice_of(pid).unwrap(), 12);
        lower(pid, 3).unwrap();
        assert_eq!(nice_of(pid).unwrap(), 12, "never raised");
        let mut plain = tokio::process::Command::new("sleep");
        plain.arg("5").kill_on_drop(true);
        child_at(&mut plain, 0);
        let plain = plain.spawn().unwrap();
        assert_eq!(nice_of(plain.id().unwrap()).unwrap(), nice_of(std::process::id()).unwrap());
    }
}
