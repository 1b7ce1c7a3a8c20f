//! CPU time of a run's own threads: what the run cost, whatever else shares the machine.
//!
//! A run trains inside its rayon pool (`sweep`), or on the calling thread with rayon's global
//! pool doing the matmuls (`switchlab train`). Its CPU time is the sum of the CPU clocks
//! (`CLOCK_THREAD_CPUTIME_ID`) of those threads, read on each of them by a rayon broadcast.

/// This thread's CPU time (user + system), seconds.
pub fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer; the clock id is a constant every POSIX system has.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc == 0 {
        ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
    } else {
        0.0
    }
}

/// CPU seconds used so far by the threads that train the calling run: every thread of the
/// current rayon pool, plus the calling thread when it is not one of them.
pub fn run_cpu_seconds() -> f64 {
    let pool: f64 = rayon::broadcast(|_| thread_cpu_seconds()).iter().sum();
    if rayon::current_thread_index().is_some() {
        pool
    } else {
        pool + thread_cpu_seconds()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_pool_counts_every_threads_work_and_an_idle_one_little() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| {
            let before = run_cpu_seconds();
            // About 0.2 s of arithmetic on each of the two threads.
            rayon::broadcast(|_| {
                let t = thread_cpu_seconds();
                let mut x = 1u64;
                while thread_cpu_seconds() - t < 0.2 {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            });
            let busy = run_cpu_seconds() - before;
            assert!((0.4..1.0).contains(&busy), "two threads × 0.2 s counted as {busy} s");
            std::thread::sleep(std::time::Duration::from_millis(200));
            let idle = run_cpu_seconds() - before - busy;
            assert!(idle < 0.1, "sleeping cost {idle} CPU seconds");
        });
    }
}
