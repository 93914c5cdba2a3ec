//! Audit sinks: JSON lines to stdout or a file, written by one dedicated thread so that a slow
//! disk or a full pipe never stalls a query, and order is kept.
//!
//! The Client never sends audit records over the network (P12): a SIEM collects the lines
//! from the container's stdout or from the file. An in-memory tap lets tests and the
//! quickstart read what was written.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use ewii_common::audit::{AuditRecord, Event, Format, Side};
use tokio::sync::Notify;

pub mod metrics;

pub use metrics::{Metrics, Snapshot};

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditOutput {
    /// Standard output (the container log).
    Stdout,
    /// Appended to this file (created 0640 if missing).
    File(PathBuf),
    /// Nowhere (only the tap, if any). For tests and the quickstart.
    Discard,
}

enum Msg {
    Line(String),
    Flush(Done),
}

/// Who waits for a flush: a thread, or an async task.
enum Done {
    Thread(Sender<()>),
    Task(tokio::sync::oneshot::Sender<()>),
}

/// The longest a flush waits for the writer (a blocked sink must not hang a stop).
const FLUSH_BOUND: Duration = Duration::from_secs(5);

/// A handle to the audit writer. Cheap to clone; every clone writes to the same sink.
#[derive(Clone)]
pub struct Audit {
    side: Side,
    format: Format,
    tx: Sender<Msg>,
    tap: Option<Arc<Tap>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").field("side", &self.side).finish()
    }
}

#[derive(Default)]
struct Tap {
    records: Mutex<Vec<AuditRecord>>,
    changed: Notify,
}

impl Audit {
    /// Starts the writer thread for `output`.
    pub fn open(side: Side, output: &AuditOutput) -> io::Result<Self> {
        let sink: Box<dyn Write + Send> = match output {
            AuditOutput::Stdout => Box::new(io::stdout()),
            AuditOutput::File(path) => {
                let mut opts = OpenOptions::new();
                opts.create(true).append(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o640);
                Box::new(opts.open(path)?)
            }
            AuditOutput::Discard => Box::new(io::sink()),
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        thread::Builder::new()
            .name("ewii-audit".into())
            .spawn(move || writer(BufWriter::new(sink), rx))?;
        Ok(Self {
            side,
            format: Format::Ewii,
            tx,
            tap: None,
            metrics: Arc::default(),
        })
    }

    /// Renders lines in `format` (the tap keeps the records themselves).
    pub fn with_format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// Like [`open`](Self::open), and also keeps every record in memory for [`records`](Self::records).
    pub fn open_with_tap(side: Side, output: &AuditOutput) -> io::Result<Self> {
        let mut a = Self::open(side, output)?;
        a.tap = Some(Arc::default());
        Ok(a)
    }

    /// Which side this handle writes for.
    pub fn side(&self) -> Side {
        self.side
    }

    /// A fresh record for `event`, stamped now, for this side.
    pub fn record(&self, event: Event) -> AuditRecord {
        AuditRecord::new(crate::now_timestamp(), self.side, event)
    }

    /// The counters of every record emitted through this handle and its clones.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Writes one record. Never blocks on the sink.
    pub fn emit(&self, record: AuditRecord) {
        self.metrics.count(&record);
        let line = record.render(self.format);
        if self.tx.send(Msg::Line(line)).is_err() {
            // The writer thread is gone (it only exits when every sender is dropped, so this
            // is unreachable while `self` lives); say so rather than lose the record silently.
            tracing::error!("audit writer gone; record not written");
        }
        if let Some(tap) = &self.tap {
            if let Ok(mut records) = tap.records.lock() {
                records.push(record);
            }
            tap.changed.notify_waiters();
        }
    }

    /// Waits (at most 5 s) until every record emitted so far is written and flushed. Blocks
    /// the calling thread: async code uses [`flush_async`](Self::flush_async).
    pub fn flush(&self) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.tx.send(Msg::Flush(Done::Thread(tx))).is_ok() {
            let _ = rx.recv_timeout(FLUSH_BOUND);
        }
    }

    /// [`flush`](Self::flush) for async code: awaits the writer thread, never blocks a worker.
    pub async fn flush_async(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Msg::Flush(Done::Task(tx))).is_ok() {
            let _ = tokio::time::timeout(FLUSH_BOUND, rx).await;
        }
    }

    /// Everything written so far (only with a tap; empty otherwise).
    pub fn records(&self) -> Vec<AuditRecord> {
        self.tap
            .as_ref()
            .and_then(|t| t.records.lock().ok().map(|r| r.clone()))
            .unwrap_or_default()
    }

    /// Waits up to `timeout` for a record matching `pred` (only with a tap).
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&AuditRecord) -> bool,
    ) -> Option<AuditRecord> {
        let tap = self.tap.as_ref()?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = tap.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = tap
                .records
                .lock()
                .ok()
                .and_then(|r| r.iter().find(|r| pred(r)).cloned())
            {
                return Some(r);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

fn writer(mut out: BufWriter<Box<dyn Write + Send>>, rx: Receiver<Msg>) {
    while let Ok(msg) = rx.recv() {
        let mut pending = Some(msg);
        // Write everything queued, then flush once: batching without delaying a lone record.
        while let Some(msg) = pending.take() {
            match msg {
                Msg::Line(line) => {
                    if let Err(e) = writeln!(out, "{line}") {
                        tracing::error!(error = %e, "audit write failed");
                    }
                }
                Msg::Flush(done) => {
                    let _ = out.flush();
                    match done {
                        Done::Thread(tx) => drop(tx.send(())),
                        Done::Task(tx) => drop(tx.send(())),
                    }
                }
            }
            pending = rx.try_recv().ok();
        }
        if let Err(e) = out.flush() {
            tracing::error!(error = %e, "audit flush failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use ewii_common::audit::Outcome;

    use super::*;

    #[test]
    fn p12_the_file_sink_writes_one_complete_json_line_per_record_in_either_format() {
        let dir = tempfile::tempdir().unwrap();
        for format in [Format::Ewii, Format::Ocsf] {
            let path = dir.path().join(format!("{format:?}.jsonl"));
            let audit = Audit::open(Side::Hub, &AuditOutput::File(path.clone()))
                .unwrap()
                .with_format(format);
            for i in 0..100u64 {
                let mut r = audit.record(Event::Query);
                r.bytes_up = Some(i);
                r.outcome = Some(Outcome::Ok);
                r.reason = Some("line\nbreak \"quoted\"".into());
                audit.emit(r);
            }
            audit.flush();
            let text = std::fs::read_to_string(&path).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 100, "{format:?}");
            for (i, line) in lines.iter().enumerate() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                match format {
                    Format::Ewii => assert_eq!(v["bytes_up"], i as u64),
                    Format::Ocsf => {
                        assert_eq!(v["class_uid"], 4001);
                        assert_eq!(v["traffic"]["bytes_out"], i as u64);
                    }
                }
            }
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode & 0o007, 0, "not world-readable");
            }
        }
    }
}
