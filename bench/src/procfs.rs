//! Reading the kernel's accounts of the process under test: CPU time from `/proc/PID/stat`,
//! memory from `/proc/PID/smaps_rollup`, socket memory from `/proc/net/sockstat`, and the
//! machine's CPU model from `/proc/cpuinfo`. Parsing is done by plain functions over text.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// A /proc file that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcError {
    /// The file could not be read (the process may have exited).
    #[error("reading {path}: {source}")]
    Read {
        /// Which file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file's text did not have the expected shape.
    #[error("parsing {what}: {why}")]
    Parse {
        /// Which file kind.
        what: &'static str,
        /// What was missing.
        why: &'static str,
    },
}

fn read(path: &Path) -> Result<String, ProcError> {
    std::fs::read_to_string(path).map_err(|source| ProcError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// User and system CPU time of a process, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTicks {
    /// utime (field 14).
    pub user: u64,
    /// stime (field 15).
    pub system: u64,
    /// Parent pid (field 4).
    pub ppid: u32,
}

impl CpuTicks {
    /// utime + stime.
    pub fn total(&self) -> u64 {
        self.user + self.system
    }
}

/// Parses `/proc/PID/stat`. The command name (field 2) may hold spaces and parentheses, so the
/// fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Result<CpuTicks, ProcError> {
    let err = |why| ProcError::Parse {
        what: "/proc/PID/stat",
        why,
    };
    let close = text
        .rfind(')')
        .ok_or(err("no ')' after the command name"))?;
    // After ") ": field 3 (state) is index 0, so field N is index N - 3.
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<u64, ProcError> {
        fields
            .get(n - 3)
            .ok_or(err("too few fields"))?
            .parse()
            .map_err(|_| err("a numeric field is not a number"))
    };
    Ok(CpuTicks {
        ppid: u32::try_from(field(4)?).map_err(|_| err("ppid out of range"))?,
        user: field(14)?,
        system: field(15)?,
    })
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name, handled below.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// CPU seconds (user + system) used so far by `pid`.
pub fn cpu_seconds(pid: u32) -> Result<f64, ProcError> {
    let t = parse_stat(&read(Path::new(&format!("/proc/{pid}/stat")))?)?;
    Ok(t.total() as f64 / ticks_per_second() as f64)
}

/// The pids whose parent is `pid` (nginx's workers under its master).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            read(Path::new(&format!("/proc/{child}/stat")))
                .ok()
                .and_then(|t| parse_stat(&t).ok())
                .is_some_and(|t| t.ppid == pid)
        })
        .collect()
}

/// Resident and proportional set size of a process, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Memory {
    /// Rss.
    pub rss_kib: u64,
    /// Pss.
    pub pss_kib: u64,
}

impl std::ops::Add for Memory {
    type Output = Memory;
    fn add(self, o: Memory) -> Memory {
        Memory {
            rss_kib: self.rss_kib + o.rss_kib,
            pss_kib: self.pss_kib + o.pss_kib,
        }
    }
}

/// Parses `/proc/PID/smaps_rollup`.
pub fn parse_smaps_rollup(text: &str) -> Result<Memory, ProcError> {
    let kib = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
    };
    Ok(Memory {
        rss_kib: kib("Rss").ok_or(ProcError::Parse {
            what: "smaps_rollup",
            why: "no Rss line",
        })?,
        pss_kib: kib("Pss").ok_or(ProcError::Parse {
            what: "smaps_rollup",
            why: "no Pss line",
        })?,
    })
}

/// Memory of `pid` now.
pub fn memory(pid: u32) -> Result<Memory, ProcError> {
    parse_smaps_rollup(&read(Path::new(&format!("/proc/{pid}/smaps_rollup")))?)
}

/// The TCP line of `/proc/net/sockstat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TcpSockstat {
    /// Sockets in use (this network namespace).
    pub inuse: u64,
    /// Socket buffer memory in pages (counted for the whole kernel).
    pub mem_pages: u64,
}

/// Parses `/proc/net/sockstat`.
pub fn parse_sockstat(text: &str) -> Result<TcpSockstat, ProcError> {
    let err = |why| ProcError::Parse {
        what: "/proc/net/sockstat",
        why,
    };
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .ok_or(err("no TCP line"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let value = |key: &str| {
        words
            .windows(2)
            .find(|w| w[0] == key)
            .and_then(|w| w[1].parse::<u64>().ok())
    };
    Ok(TcpSockstat {
        inuse: value("inuse").ok_or(err("no inuse"))?,
        mem_pages: value("mem").ok_or(err("no mem"))?,
    })
}

/// The first `model name` of `/proc/cpuinfo`.
pub fn parse_cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_a_hostile_command_name() {
        let text = "4242 (nginx: worker) (x) S 4241 4241 4241 0 -1 4194624 \
                    1266 0 0 0 731 96 0 0 20 0 1 0 4213 12345 678 184467 1 1 0 0 0 0\n";
        let t = parse_stat(text).unwrap();
        assert_eq!(t.user, 731);
        assert_eq!(t.system, 96);
        assert_eq!(t.ppid, 4241);
        assert_eq!(t.total(), 827);
        assert!(parse_stat("12 (x) S 1").is_err());
        assert!(parse_stat("no paren").is_err());
    }

    #[test]
    fn smaps_rollup() {
        let text = "55d7c4a3f000-7ffd6b1f6000 ---p 00000000 00:00 0  [rollup]\n\
                    Rss:               12044 kB\nPss:                8123 kB\n\
                    Pss_Anon:           4000 kB\nShared_Clean:       5000 kB\n";
        assert_eq!(
            parse_smaps_rollup(text).unwrap(),
            Memory {
                rss_kib: 12044,
                pss_kib: 8123
            }
        );
        assert!(parse_smaps_rollup("Pss_Anon: 1 kB\n").is_err());
    }

    #[test]
    fn sockstat() {
        let text = "sockets: used 188\nTCP: inuse 10005 orphan 0 tw 3 alloc 10012 mem 2531\n\
                    UDP: inuse 2 mem 4\n";
        assert_eq!(
            parse_sockstat(text).unwrap(),
            TcpSockstat {
                inuse: 10005,
                mem_pages: 2531
            }
        );
        assert!(parse_sockstat("UDP: inuse 2 mem 4\n").is_err());
    }

    #[test]
    fn cpu_model() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) \
                    Platinum 8375C CPU @ 2.90GHz\nmodel name\t: other\n";
        assert_eq!(
            parse_cpu_model(text).as_deref(),
            Some("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz")
        );
        assert_eq!(parse_cpu_model("flags: x\n"), None);
    }

    #[test]
    fn our_own_process_is_readable() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(memory(pid).unwrap().rss_kib > 0);
    }
}
