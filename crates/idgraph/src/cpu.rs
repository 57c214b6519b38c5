//! CPU time of the whole process and of single threads, read from /proc (Linux); `None`
//! elsewhere. Machines are shared and wall-clock rates move with the neighbours, so the
//! benchmark and the run summary report CPU seconds as well.

/// User plus system CPU seconds in a /proc `stat` file: its 14th and 15th fields, counted
/// after the parenthesised command name (which may contain spaces). Assumes the usual 100
/// clock ticks per second.
fn stat_cpu_seconds(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// CPU seconds every thread of this process has used so far.
pub fn process_cpu_seconds() -> Option<f64> {
    stat_cpu_seconds("/proc/self/stat")
}

/// CPU seconds the calling thread has used so far.
pub fn thread_cpu_seconds() -> Option<f64> {
    stat_cpu_seconds("/proc/thread-self/stat")
}

/// CPU seconds used between two readings, if both were taken.
pub fn since(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    Some((after? - before?).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_busy_thread_sees_its_own_time_within_the_process_total() {
        let process_before = process_cpu_seconds();
        let thread_before = thread_cpu_seconds();
        // Spin (not sleep) for 0.3 s of wall time: at least that much CPU, 30 clock ticks.
        let started = std::time::Instant::now();
        let mut spins = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(300) {
            spins = std::hint::black_box(spins + 1);
        }
        let thread = since(thread_before, thread_cpu_seconds()).expect("linux has /proc");
        let process = since(process_before, process_cpu_seconds()).expect("linux has /proc");
        // A shared machine may take the core away for a while; most of the time is ours.
        assert!(
            thread >= 0.1,
            "thread cpu {thread} s after 0.3 s of spinning"
        );
        assert!(
            process + 0.02 >= thread,
            "process cpu {process} s below its own thread's {thread} s"
        );
    }

    #[test]
    fn missing_readings_give_no_figure() {
        assert_eq!(since(None, Some(1.0)), None);
        assert_eq!(since(Some(2.0), Some(2.5)), Some(0.5));
    }
}
