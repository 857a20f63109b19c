//! Reading the kernel's accounts of the process under test: CPU time from `/proc/PID/stat`,
//! memory from `/proc/PID/smaps_rollup`, a process's children, and the machine's CPU model from
//! `/proc/cpuinfo`, all through the `procfs` crate; plus the TCP line of `/proc/net/sockstat`,
//! which procfs 0.18 has no parser for and which the bench reads with `cat` inside the namespace
//! under test (that file is per network namespace), so it is parsed here from that text.

use procfs::process::{Process, SmapsRollup, Stat};
use procfs::{Current as _, FromRead as _};
use serde::{Deserialize, Serialize};

/// A /proc file that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcError {
    /// procfs could not read or parse a file (the process may have exited).
    #[error("reading {what}: {source}")]
    Procfs {
        /// Which file.
        what: String,
        /// Why.
        #[source]
        source: procfs::ProcError,
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

fn procfs_err(what: impl Into<String>) -> impl FnOnce(procfs::ProcError) -> ProcError {
    let what = what.into();
    move |source| ProcError::Procfs { what, source }
}

fn process(pid: u32) -> Result<Process, ProcError> {
    let id = i32::try_from(pid).map_err(|_| ProcError::Parse {
        what: "a pid",
        why: "out of range",
    })?;
    Process::new(id).map_err(procfs_err(format!("/proc/{pid}")))
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

impl TryFrom<&Stat> for CpuTicks {
    type Error = ProcError;

    fn try_from(s: &Stat) -> Result<Self, ProcError> {
        Ok(Self {
            user: s.utime,
            system: s.stime,
            ppid: u32::try_from(s.ppid).map_err(|_| ProcError::Parse {
                what: "/proc/PID/stat",
                why: "ppid out of range",
            })?,
        })
    }
}

/// Parses `/proc/PID/stat` text (procfs counts the fields from the last `)`, so a command name
/// with spaces and parentheses does not shift them).
pub fn parse_stat(text: &str) -> Result<CpuTicks, ProcError> {
    let stat = Stat::from_read(text.as_bytes()).map_err(procfs_err("/proc/PID/stat"))?;
    CpuTicks::try_from(&stat)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn ticks_per_second() -> u64 {
    procfs::ticks_per_second()
}

/// CPU seconds (user + system) used so far by `pid`.
pub fn cpu_seconds(pid: u32) -> Result<f64, ProcError> {
    let stat = process(pid)?
        .stat()
        .map_err(procfs_err(format!("/proc/{pid}/stat")))?;
    Ok(CpuTicks::try_from(&stat)?.total() as f64 / ticks_per_second() as f64)
}

/// The pids whose parent is `pid` (nginx's workers under its master).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.filter_map(|p| p.ok()?.stat().ok())
        .filter(|s| u32::try_from(s.ppid).is_ok_and(|ppid| ppid == pid))
        .filter_map(|s| u32::try_from(s.pid).ok())
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

impl TryFrom<&SmapsRollup> for Memory {
    type Error = ProcError;

    fn try_from(r: &SmapsRollup) -> Result<Self, ProcError> {
        // procfs gives the sizes in bytes.
        let kib = |key: &str, why| {
            r.memory_map_rollup
                .iter()
                .find_map(|m| m.extension.map.get(key))
                .map(|bytes| bytes / 1024)
                .ok_or(ProcError::Parse {
                    what: "smaps_rollup",
                    why,
                })
        };
        Ok(Memory {
            rss_kib: kib("Rss", "no Rss line")?,
            pss_kib: kib("Pss", "no Pss line")?,
        })
    }
}

/// Parses `/proc/PID/smaps_rollup` text.
pub fn parse_smaps_rollup(text: &str) -> Result<Memory, ProcError> {
    let rollup =
        SmapsRollup::from_read(text.as_bytes()).map_err(procfs_err("/proc/PID/smaps_rollup"))?;
    Memory::try_from(&rollup)
}

/// Memory of `pid` now.
pub fn memory(pid: u32) -> Result<Memory, ProcError> {
    let rollup = process(pid)?
        .smaps_rollup()
        .map_err(procfs_err(format!("/proc/{pid}/smaps_rollup")))?;
    Memory::try_from(&rollup)
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

/// The first CPU's `model name` in `/proc/cpuinfo` text.
pub fn parse_cpu_model(cpuinfo: &str) -> Option<String> {
    procfs::CpuInfo::from_read(cpuinfo.as_bytes())
        .ok()?
        .model_name(0)
        .map(str::to_owned)
}

/// This machine's CPU model.
pub fn cpu_model() -> Option<String> {
    procfs::CpuInfo::current()
        .ok()?
        .model_name(0)
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_a_hostile_command_name() {
        // A whole line, as every kernel since 2.6 writes at least: procfs needs all 36 fields.
        let text = "4242 (nginx: worker) (x) S 4241 4241 4241 0 -1 4194624 \
                    1266 0 0 0 731 96 0 0 20 0 1 0 4213 12345 678 184467 1 1 0 0 0 0 \
                    0 0 0 0 0 17 1 0 0 0 0 0\n";
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
        // Two CPUs, as the kernel writes them: a block each, separated by a blank line.
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) \
                    Platinum 8375C CPU @ 2.90GHz\n\nprocessor\t: 1\nmodel name\t: other\n";
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
