//! The processor's data caches as Linux describes them in sysfs: what the packed GEMM sizes its
//! blocking from (`kernels::packed`), and what the benchmarks size their bandwidth arrays from.
//! Read once; empty where sysfs cannot be read (other systems), and callers fall back.

use std::sync::OnceLock;

/// One data or unified cache of CPU 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cache {
    /// 1 for L1, 2 for L2, ...
    pub level: u32,
    /// Its whole size in bytes.
    pub bytes: usize,
    /// Logical CPUs sharing it (at least 1).
    pub sharing: usize,
}

/// CPU 0's data and unified caches, nearest first.
pub fn caches() -> &'static [Cache] {
    static CACHES: OnceLock<Vec<Cache>> = OnceLock::new();
    CACHES.get_or_init(read)
}

/// One CPU's share of the level-`level` cache in bytes, if known.
pub fn share_of(level: u32) -> Option<usize> {
    caches().iter().find(|c| c.level == level).map(|c| c.bytes / c.sharing)
}

/// The largest cache in bytes (0 when unknown).
pub fn last_level_bytes() -> usize {
    caches().iter().map(|c| c.bytes).max().unwrap_or(0)
}

fn read() -> Vec<Cache> {
    let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    (0..16)
        .filter_map(|i| {
            let index = dir.join(format!("index{i}"));
            let read = |f: &str| std::fs::read_to_string(index.join(f)).ok();
            if read("type")?.trim() == "Instruction" {
                return None;
            }
            Some(Cache {
                level: read("level")?.trim().parse().ok()?,
                bytes: parse_size(read("size")?.trim())?,
                sharing: read("shared_cpu_list").and_then(|l| count_cpus(l.trim())).unwrap_or(1),
            })
        })
        .collect()
}

/// A sysfs cache size: `2048K`, `1M`, `1G`, or bytes.
fn parse_size(s: &str) -> Option<usize> {
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    };
    let scale = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    digits.parse::<usize>().ok().filter(|&v| v > 0).map(|v| v * scale)
}

/// The CPUs in a sysfs list (`0-3,8,10-11`).
fn count_cpus(list: &str) -> Option<usize> {
    let mut count = 0;
    for part in list.split(',') {
        count += match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().ok()?.checked_sub(a.parse().ok()?)? + 1,
            None => part.parse::<usize>().map(|_| 1).ok()?,
        };
    }
    (count > 0).then_some(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_cpu_lists_parse_as_sysfs_writes_them() {
        assert_eq!(parse_size("2048K"), Some(2 << 20));
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("524288"), Some(512 << 10));
        assert_eq!(parse_size("0K"), None);
        assert_eq!(parse_size("12Q"), None);
        assert_eq!(count_cpus("0"), Some(1));
        assert_eq!(count_cpus("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpus("3-1"), None);
        assert_eq!(count_cpus(""), None);
        // Where sysfs is there (the Linux machines this runs on), the levels come nearest first.
        let levels: Vec<u32> = caches().iter().map(|c| c.level).collect();
        assert!(levels.windows(2).all(|w| w[0] <= w[1]), "{levels:?}");
        assert!(caches().iter().all(|c| c.bytes > 0 && c.sharing >= 1));
    }
}
