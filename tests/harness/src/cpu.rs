//! CPU affinity, so a benchmark can keep the brokers and the consumer it
//! measures on separate cores instead of letting them compete for both.

use std::io;

use nix::{sched::CpuSet, unistd::Pid};

/// Restricts every thread of process `pid` to `cpus`.
///
/// Threads the process starts later inherit the affinity of the thread that
/// starts them, so once every thread is pinned, all later ones are too. The
/// thread list is read until a pass finds no new thread, which catches the
/// threads started while it was being pinned; a thread that exits meanwhile
/// is skipped.
///
/// # Errors
/// If `cpus` is empty or names a CPU beyond `CPU_SETSIZE` (1,024), if the process
/// is gone, or if the kernel refuses (e.g. a CPU outside this cgroup's set).
pub fn pin_process(pid: u32, cpus: &[usize]) -> io::Result<()> {
    let set = cpu_set(cpus)?;
    let mut pinned = Vec::new();
    loop {
        let mut new = 0;
        for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let Some(tid) = entry?.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            if pinned.contains(&tid) {
                continue;
            }
            match nix::sched::sched_setaffinity(Pid::from_raw(tid), &set) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(e.into()),
            }
            pinned.push(tid);
            new += 1;
        }
        if new == 0 {
            return Ok(());
        }
    }
}

/// Restricts the calling thread (and the threads it starts later) to `cpus`.
///
/// # Errors
/// As [`pin_process`].
pub fn pin_this_thread(cpus: &[usize]) -> io::Result<()> {
    nix::sched::sched_setaffinity(Pid::from_raw(0), &cpu_set(cpus)?).map_err(Into::into)
}

/// The CPUs the calling thread may run on, in ascending order.
///
/// # Errors
/// If the kernel refuses to say.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(Pid::from_raw(0))?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

fn cpu_set(cpus: &[usize]) -> io::Result<CpuSet> {
    if cpus.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no CPU to pin to",
        ));
    }
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu).map_err(io::Error::from)?;
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed() -> Vec<usize> {
        allowed_cpus().expect("sched_getaffinity")
    }

    #[test]
    fn a_pinned_thread_and_the_threads_it_starts_run_only_there() {
        // Run on a thread of its own, so the test runner's threads keep theirs.
        std::thread::spawn(|| {
            let first = allowed()[0];
            pin_this_thread(&[first]).expect("pin this thread");
            assert_eq!(allowed(), vec![first]);
            let child = std::thread::spawn(allowed).join().expect("child thread");
            assert_eq!(child, vec![first], "a thread inherits its creator's CPUs");
        })
        .join()
        .expect("pinning thread");
    }

    /// The CPUs each thread of `pid` may run on, from /proc.
    fn threads_cpus(pid: u32) -> Vec<String> {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list the threads");
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
            .filter_map(|status| {
                let list = status
                    .lines()
                    .find_map(|l| l.strip_prefix("Cpus_allowed_list:"));
                list.map(|l| l.trim().to_owned())
            })
            .collect()
    }

    /// nats-server is what the benchmarks pin, and a Go process with many
    /// threads: each one must be pinned, not only the main thread (which is
    /// all /proc/PID/status shows).
    #[tokio::test(flavor = "multi_thread")]
    async fn every_thread_of_a_running_server_is_pinned() {
        let mine = allowed();
        // On one CPU the server would run only there anyway, pinned or not.
        let Some(&last) = mine.last().filter(|_| mine.len() >= 2) else {
            eprintln!(
                "skipped: pinning can only be seen with two CPUs or more, this test has {mine:?}"
            );
            return;
        };
        let nats = crate::NatsServer::start().await;
        let pid = nats.pid().expect("nats-server is running");
        let before = threads_cpus(pid);
        assert!(
            before.iter().all(|c| *c != last.to_string()),
            "nats-server starts with this test's CPUs, not only {last}: {before:?}"
        );
        pin_process(pid, &[last]).expect("pin nats-server");
        // Make it work (and start threads) after the pin: they must inherit it.
        let client = async_nats::connect(nats.url()).await.expect("connect");
        for i in 0..1000 {
            client
                .publish("pin.test", i.to_string().into())
                .await
                .expect("publish");
        }
        client.flush().await.expect("flush");
        let cpus = threads_cpus(pid);
        assert!(cpus.len() > 1, "nats-server has several threads: {cpus:?}");
        assert!(
            cpus.iter().all(|c| *c == last.to_string()),
            "every thread on CPU {last}: {cpus:?}"
        );
    }

    #[test]
    fn no_cpus_is_refused() {
        assert_eq!(
            pin_this_thread(&[]).expect_err("empty set").kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
