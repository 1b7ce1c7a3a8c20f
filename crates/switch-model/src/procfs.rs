//! The one reader of Linux's `/proc` files: memory figures for the memory guard, benchmarks and
//! memory tests, and this process's CPU times. Every function returns `None` where the file or
//! field does not exist (another OS, a sandbox), so callers decide what "unknown" means.

/// The first number on the line of `file` that starts with `key` (e.g. `MemAvailable:` in
/// `/proc/meminfo`, `VmRSS:` in `/proc/self/status`), × 1024: those files count in KiB.
pub fn kib_field_bytes(file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix(key))?;
    Some(line.trim_start_matches(':').split_whitespace().next()?.parse::<u64>().ok()? * 1024)
}

/// A field of `/proc/<pid>/status` in bytes (`VmRSS`: resident now, `VmHWM`: peak resident,
/// `VmSize`: address space mapped); `pid` `None` is this process.
pub fn status_bytes(pid: Option<u32>, field: &str) -> Option<u64> {
    let file = pid.map_or("/proc/self/status".to_string(), |p| format!("/proc/{p}/status"));
    kib_field_bytes(&file, &format!("{field}:"))
}

/// Resident memory of this process now, bytes (0 where it cannot be read).
pub fn resident_bytes() -> u64 {
    status_bytes(None, "VmRSS").unwrap_or(0)
}

/// `MemAvailable` of `/proc/meminfo`, bytes.
pub fn mem_available_bytes() -> Option<u64> {
    kib_field_bytes("/proc/meminfo", "MemAvailable:")
}

/// CPU time of this process so far, (user, kernel) seconds, from `/proc/self/stat` (clock ticks
/// of 1/100 s, Linux's USER_HZ).
pub fn cpu_times() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the ")" that ends the command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    Some((f.get(11)? / 100.0, f.get(12)? / 100.0))
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_resident_memory_and_the_machine_has_some_available() {
        let rss = super::resident_bytes();
        assert!(rss > 1 << 20, "{rss}");
        assert!(super::status_bytes(None, "VmHWM").unwrap() >= rss);
        assert!(super::mem_available_bytes().unwrap() > 0);
        assert!(super::status_bytes(None, "NoSuchField").is_none());
    }
}
