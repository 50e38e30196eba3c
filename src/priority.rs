//! CPU priority for caretaker's heavy work (`[jobs] nice`, `[jobs] sched-idle`): on the real
//! box's one vCPU, what a backup burns the API's queries lose, so the processes and threads a
//! backup keeps busy yield under contention and run at full speed otherwise.
//!
//! Two levers, per task (thread) on Linux, only ever lowering a priority:
//! - a nice value: the kernel's fair scheduler gives a nice-10 task ~1/10 of a nice-0 one's share
//!   of a contended CPU — but a nice-0 request waking on a CPU a nice-10 task holds may still wait
//!   for that task's slice to run out;
//! - `SCHED_IDLE`: the task runs only when nothing else wants the CPU, and a waking task of any
//!   other policy preempts it at once (the kernel's wakeup path: "idle tasks are by definition
//!   preempted by non-idle tasks"). That is the one that bounds the API's wait.
//!
//! A thread lowered here is one started for the work ([`spawn_thread_at`]): it ends with the
//! work, so nothing else ever runs at its priority (returning a task from `SCHED_IDLE` to normal
//! would need CAP_SYS_NICE).

use nix::libc;

/// How low caretaker's heavy work runs: `[jobs] nice` and `[jobs] sched-idle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Priority {
    /// 0–19; 0 leaves the nice value as it is.
    pub nice: i32,
    /// `SCHED_IDLE` (the task runs only on a CPU nothing else wants).
    pub idle: bool,
}

impl Priority {
    /// Left as it is.
    pub const NORMAL: Priority = Priority { nice: 0, idle: false };

    /// Whether anything is lowered at all.
    pub fn lowers(&self) -> bool {
        self.nice > 0 || self.idle
    }

    /// Task `pid`'s priority as the kernel reports it (its nice value and whether its policy is
    /// `SCHED_IDLE`; `pid` 0: the calling thread): what a journal line says, read back rather
    /// than assumed.
    pub fn of(pid: u32) -> std::io::Result<Priority> {
        // SAFETY: sched_getscheduler only reads the task's policy.
        let policy = unsafe { libc::sched_getscheduler(pid as libc::pid_t) };
        if policy < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Priority { nice: task_nice(pid)?, idle: policy == libc::SCHED_IDLE })
    }
}

impl std::fmt::Display for Priority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.idle, self.nice) {
            (true, n) => write!(f, "SCHED_IDLE (nice {n})"),
            (false, n) => write!(f, "nice {n}"),
        }
    }
}

/// The nice value of process `pid` (its main thread; the kernel's view).
pub fn nice_of(pid: u32) -> std::io::Result<i32> {
    stat_nice(&format!("/proc/{pid}/stat"))
}

/// Task `pid`'s nice value; `pid` 0: the calling thread's.
fn task_nice(pid: u32) -> std::io::Result<i32> {
    if pid == 0 { stat_nice("/proc/thread-self/stat") } else { nice_of(pid) }
}

fn stat_nice(path: &str) -> std::io::Result<i32> {
    let stat = std::fs::read_to_string(path)?;
    // pid (comm) state … : comm may hold spaces and parentheses; fields resume after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    rest.split_whitespace()
        .nth(16)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no nice value in {path}")))
}

/// Lowers task `pid` to `p`: its nice value is raised to `p.nice` if that lowers it (never
/// lowered), and its policy becomes `SCHED_IDLE` if `p.idle`. Another user's process needs
/// CAP_SYS_NICE. `pid` 0 is the calling thread.
pub fn lower(pid: u32, p: Priority) -> std::io::Result<()> {
    if p.nice > task_nice(pid)? {
        // SAFETY: setpriority has no memory effects; `pid` names one task.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS as _, pid as _, p.nice) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    if p.idle {
        set_idle(pid as libc::pid_t)?;
    }
    Ok(())
}

/// `SCHED_IDLE` for task `pid` (0: the calling thread); the nice value is kept.
fn set_idle(pid: libc::pid_t) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` outlives the call; sched_setscheduler has no other memory effects.
    if unsafe { libc::sched_setscheduler(pid, libc::SCHED_IDLE, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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

/// Makes the child `cmd` starts run at `p` from its first instruction (set in the child after
/// fork, as its own user: lowering one's own priority needs no privilege).
pub fn child_at(cmd: &mut tokio::process::Command, p: Priority) {
    if !p.lowers() {
        return;
    }
    // SAFETY: the closure runs between fork and exec and calls only setpriority and
    // sched_setscheduler, which are async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            if p.nice > 0 && libc::setpriority(libc::PRIO_PROCESS as _, 0, p.nice) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if p.idle {
                set_idle(0)?;
            }
            Ok(())
        });
    }
}

/// A thread started for one piece of blocking work (a backup's encoder, a drill's decoder) at a
/// priority of its own; it ends with the work.
pub struct WorkThread<T> {
    rx: tokio::sync::oneshot::Receiver<T>,
    name: &'static str,
}

/// Runs `work` on a new thread named `name` at priority `p` (a failure to lower it is logged,
/// not fatal: the work still gets done). Unlike `spawn_blocking`'s pooled threads, this one is
/// never reused, so nothing else ever runs at the lowered priority.
pub fn spawn_thread_at<T, F>(p: Priority, name: &'static str, work: F) -> std::io::Result<WorkThread<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name(name.into()).spawn(move || {
        if p.lowers()
            && let Err(e) = lower(0, p)
        {
            tracing::warn!("cannot lower the {name} thread to {p}: {e}");
        }
        let _ = tx.send(work());
    })?;
    Ok(WorkThread { rx, name })
}

impl<T> WorkThread<T> {
    /// The work's result, awaited without blocking the runtime; an error if the thread panicked.
    pub async fn join(self) -> Result<T, String> {
        self.rx.await.map_err(|_| format!("the {} thread panicked", self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper(p: Priority) -> tokio::process::Child {
        let mut cmd = tokio::process::Command::new("sleep");
        cmd.arg("5").kill_on_drop(true);
        child_at(&mut cmd, p);
        cmd.spawn().unwrap()
    }

    #[tokio::test]
    async fn a_child_starts_lowered_and_a_running_process_is_lowered_never_raised() {
        let own = Priority::of(std::process::id()).unwrap();
        assert!(!own.idle, "the test runs at a normal policy");
        let child = sleeper(Priority { nice: 7, idle: false });
        let pid = child.id().unwrap();
        assert_eq!(Priority::of(pid).unwrap(), Priority { nice: 7, idle: false });
        lower(pid, Priority { nice: 12, idle: false }).unwrap();
        assert_eq!(nice_of(pid).unwrap(), 12);
        lower(pid, Priority { nice: 3, idle: false }).unwrap();
        assert_eq!(nice_of(pid).unwrap(), 12, "never raised");
        lower(pid, Priority { nice: 3, idle: true }).unwrap();
        assert_eq!(Priority::of(pid).unwrap(), Priority { nice: 12, idle: true }, "idle, nice kept");
        assert_eq!(Priority::of(pid).unwrap().to_string(), "SCHED_IDLE (nice 12)");

        let idle = sleeper(Priority { nice: 10, idle: true });
        assert_eq!(Priority::of(idle.id().unwrap()).unwrap(), Priority { nice: 10, idle: true });
        let plain = sleeper(Priority::NORMAL);
        assert_eq!(Priority::of(plain.id().unwrap()).unwrap(), own);
    }

    #[tokio::test]
    async fn a_work_thread_runs_lowered_and_leaves_its_caller_alone() {
        let before = Priority::of(0).unwrap();
        let seen = spawn_thread_at(Priority { nice: 9, idle: true }, "prio-test", || {
            let tid = unsafe { libc::gettid() } as u32;
            (Priority::of(0).unwrap(), task_nice(0).unwrap(), tid)
        })
        .unwrap()
        .join()
        .await
        .unwrap();
        assert!(seen.0.idle, "{seen:?}");
        assert_eq!(seen.1, 9, "{seen:?}");
        assert_ne!(seen.2, std::process::id());
        assert_eq!(Priority::of(0).unwrap(), before, "the caller's thread is untouched");
        let normal = spawn_thread_at(Priority::NORMAL, "prio-test", || Priority::of(0).unwrap().idle);
        assert!(!normal.unwrap().join().await.unwrap());
        let panicked = spawn_thread_at(Priority::NORMAL, "prio-test", || -> u8 { panic!("boom") });
        assert_eq!(panicked.unwrap().join().await.unwrap_err(), "the prio-test thread panicked");
    }
}
