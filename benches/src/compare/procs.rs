//! Processes of the systems under test: spawning, readiness, CPU time and RSS from `/proc`.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{bail, Context};

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ; 100 on every Linux port).
const USER_HZ: f64 = 100.0;

/// A free loopback port (the OS picks it; the next process binds it).
pub fn free_port(udp: bool) -> anyhow::Result<u16> {
    Ok(if udp {
        UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port()
    } else {
        TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()
    })
}

/// A free loopback TCP address.
pub fn free_tcp() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port(false)?)))
}

/// A running process of a system under test; killed when dropped.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    child: Child,
    /// Lines of its stdout and stderr seen so far (kept bounded).
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

/// Lines kept per process; older ones are dropped (audit lines of a long run).
const KEEP_LINES: usize = 2_000;

impl Proc {
    /// Starts `program args` with stdout and stderr read into memory, in `cgroup` if given.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[&str],
        cgroup: Option<&Path>,
    ) -> anyhow::Result<Self> {
        Self::spawn_as(name, program, args, cgroup, None)
    }

    /// [`Self::spawn`], as user and group `uid` if given (the caller must be root).
    pub fn spawn_as(
        name: &str,
        program: &Path,
        args: &[&str],
        cgroup: Option<&Path>,
        uid: Option<u32>,
    ) -> anyhow::Result<Self> {
        let mut cmd = match cgroup {
            Some(cg) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
                    .arg(cg)
                    .arg(program);
                c
            }
            None => Command::new(program),
        };
        if let Some(uid) = uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().context("stdout")?;
        let err = child.stderr.take().context("stderr")?;
        for stream in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let mut l = lines.lock().unwrap_or_else(|e| e.into_inner());
                    if l.len() >= KEEP_LINES {
                        l.drain(..KEEP_LINES / 2);
                    }
                    l.push((Instant::now(), line));
                }
            });
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            lines,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When a line containing `needle` first appeared, waiting up to `within`.
    pub fn wait_line(&mut self, needle: &str, within: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + within;
        loop {
            if let Some((at, _)) = self
                .lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|(_, l)| l.contains(needle))
            {
                return Ok(*at);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before it printed {needle:?}:\n{}",
                    self.name,
                    self.tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not print {needle:?} within {within:?}:\n{}",
                    self.name,
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The last lines it printed, for an error message.
    pub fn tail(&self) -> String {
        let l = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        l.iter()
            .rev()
            .take(15)
            .rev()
            .map(|(_, s)| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}):\n{}", self.name, self.tail());
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        // kill(1): this crate forbids unsafe code, so no libc::kill.
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
}

/// `chown -R uid:uid path`.
pub fn chown_tree(path: &Path, uid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid))?;
    if fs::symlink_metadata(path)?.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid)?;
        }
    }
    Ok(())
}

/// CPU seconds (user + system, all threads) a process has used so far.
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let ticks: u64 =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    Ok(ticks as f64 / USER_HZ)
}

/// Resident set size in MB (10^6 bytes).
pub fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    status_kib(pid, "VmRSS:").map(|kib| kib * 1024.0 / 1e6)
}

/// Anonymous resident memory in MB (`RssAnon`: heap and stacks, not the mapped files).
pub fn rss_anon_mb(pid: u32) -> anyhow::Result<f64> {
    status_kib(pid, "RssAnon:").map(|kib| kib * 1024.0 / 1e6)
}

fn status_kib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .with_context(|| field.to_owned())?
        .parse()?)
}

/// The machine's steal time and all its CPU time so far, in clock ticks (`/proc/stat`, the
/// `cpu` line: steal is the time the hypervisor ran something else while a vCPU wanted to run).
pub fn host_ticks() -> anyhow::Result<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("/proc/stat: a cpu field is not a number")?;
    anyhow::ensure!(
        fields.len() == 8,
        "/proc/stat: the cpu line is short: {line}"
    );
    Ok((fields[7], fields.iter().sum()))
}

/// Of the machine's CPU time between two [`host_ticks`] readings, the share stolen, in percent.
pub fn steal_percent(before: (u64, u64), after: (u64, u64)) -> Option<f64> {
    let total = after.1.checked_sub(before.1)?;
    let steal = after.0.checked_sub(before.0)?;
    (total > 0).then(|| steal as f64 / total as f64 * 100.0)
}

/// Sum of [`cpu_secs`] over `pids`.
pub fn cpu_total(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|p| cpu_secs(*p)).sum()
}

/// Runs `program args` to completion; its stdout on success.
pub fn run(program: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("starting {}", program.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({}): {}",
            program.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_a_share_of_the_ticks_between_two_readings() {
        assert_eq!(steal_percent((10, 1_000), (30, 1_400)), Some(5.0));
        assert_eq!(
            steal_percent((10, 1_000), (10, 1_000)),
            None,
            "no time passed"
        );
        assert_eq!(
            steal_percent((30, 1_400), (10, 1_000)),
            None,
            "readings swapped"
        );
        let (steal, total) = host_ticks().expect("this machine has /proc/stat");
        assert!(total > 0 && steal <= total, "{steal} of {total}");
    }
}
