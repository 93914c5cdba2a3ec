//! Audit sinks: JSON lines to stdout or a file, written by one dedicated thread so that a slow
//! disk or a full pipe never stalls a query, and order is kept.
//!
//! The Client never sends audit records over the network (P12): a SIEM collects the lines
//! from the container's stdout or from the file. An in-memory tap lets tests and the
//! quickstart read what was written.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Records waiting for the sink above which new queries are refused (`audit_backlog`).
pub const DEFAULT_BACKLOG: usize = 16_384;

/// Queries refused while the sink lagged, not yet reported.
#[derive(Debug, Default)]
struct Shed {
    count: AtomicU64,
    /// When the first of them was refused, microseconds since the epoch.
    since: AtomicU64,
}

/// A handle to the audit writer. Cheap to clone; every clone writes to the same sink.
#[derive(Clone)]
pub struct Audit {
    side: Side,
    format: Format,
    tx: Sender<Msg>,
    tap: Option<Arc<Tap>>,
    metrics: Arc<Metrics>,
    backlog: usize,
    shed: Arc<Shed>,
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
        Self::open_writer(side, sink)
    }

    /// Starts the writer thread for any sink.
    fn open_writer(side: Side, sink: Box<dyn Write + Send>) -> io::Result<Self> {
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
            backlog: DEFAULT_BACKLOG,
            shed: Arc::default(),
        })
    }

    /// Renders lines in `format` (the tap keeps the records themselves).
    pub fn with_format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// Refuses new queries while more than `records` records wait for the sink (see
    /// [`admit_query`](Self::admit_query)); at least 16.
    pub fn with_backlog(mut self, records: usize) -> Self {
        self.backlog = records.max(16);
        self
    }

    /// Whether a new query may start. While the sink is `backlog` records behind (a blocked
    /// stdout, a full disk), no: the query is refused before it does anything, and counted.
    /// Records are never dropped — work that would make more of them is refused instead, so
    /// memory stays bounded by the backlog plus the records of queries already in flight.
    /// The first query admitted after the sink caught up writes one `audit_backlog` record
    /// with the count.
    pub fn admit_query(&self) -> bool {
        if self.tx.len() >= self.backlog {
            if self.shed.count.fetch_add(1, Ordering::Relaxed) == 0 {
                self.shed
                    .since
                    .store(crate::now_timestamp().0, Ordering::Relaxed);
            }
            self.metrics.count_shed();
            return false;
        }
        let shed = self.shed.count.swap(0, Ordering::Relaxed);
        if shed > 0 {
            let since = ewii_common::time::Timestamp(self.shed.since.load(Ordering::Relaxed));
            let mut r = self.record(Event::AuditBacklog);
            r.outcome = Some(ewii_common::audit::Outcome::Refused);
            r.reason = Some(format!(
                "{shed} queries refused since {since}: the audit sink was {} records behind",
                self.backlog
            ));
            tracing::warn!(shed, %since, "the audit sink caught up; queries refused meanwhile");
            self.emit(r);
        }
        true
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

/// How long the writer lets records gather after it wrote some. A busy Hub or Client (thousands
/// of queries a second) then finds the writer awake instead of waking it for every record (a
/// futex wake-up, a context switch, a spin on the empty queue and one `write` per record: 16 %
/// of both processes' CPU at one query at a time, docs/benchmarks.md), and the records of
/// those 2 ms go out with one `write`. A lone record still leaves at once; the next one waits at
/// most this long.
const GATHER: Duration = Duration::from_millis(2);

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
        thread::sleep(GATHER);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Condvar;

    use ewii_common::audit::Outcome;

    use super::*;

    /// The state of a [`Gate`].
    #[derive(Default)]
    struct Passed {
        open: bool,
        /// Whether a write is waiting for the gate to open.
        blocked: bool,
        /// What went through.
        bytes: Vec<u8>,
    }

    /// A sink that blocks every write until opened, like a stdout nobody reads.
    #[derive(Clone, Default)]
    struct Gate(Arc<(Mutex<Passed>, Condvar)>);

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, cvar) = &*self.0;
            let mut state = lock.lock().unwrap();
            if !state.open {
                state.blocked = true;
                // Whoever waits for the writer to be stuck (`Gate::wait_blocked`) looks again.
                cvar.notify_all();
            }
            while !state.open {
                state = cvar.wait(state).unwrap();
            }
            state.blocked = false;
            state.bytes.extend_from_slice(buf);
            // Whoever waits for lines (`Gate::wait_lines`) looks again.
            cvar.notify_all();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Gate {
        /// Waits until a write is stuck at the closed gate, at most `within`; whether one is.
        fn wait_blocked(&self, within: Duration) -> bool {
            let (lock, cvar) = &*self.0;
            let state = lock.lock().unwrap();
            let (_state, waited) = cvar
                .wait_timeout_while(state, within, |s| !s.blocked)
                .unwrap();
            !waited.timed_out()
        }

        /// Waits until `n` whole lines went through, at most `within`; whether they did.
        fn wait_lines(&self, n: usize, within: Duration) -> bool {
            let (lock, cvar) = &*self.0;
            let state = lock.lock().unwrap();
            let (_state, waited) = cvar
                .wait_timeout_while(state, within, |s| {
                    s.bytes.iter().filter(|&&b| b == b'\n').count() < n
                })
                .unwrap();
            !waited.timed_out()
        }

        fn open(&self) {
            self.0 .0.lock().unwrap().open = true;
            self.0 .1.notify_all();
        }
        fn lines(&self) -> Vec<serde_json::Value> {
            let text = String::from_utf8(self.0 .0.lock().unwrap().bytes.clone()).unwrap();
            text.lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }
    }

    #[test]
    fn p11_a_blocked_sink_refuses_new_queries_and_loses_no_record() {
        let gate = Gate::default();
        let audit = Audit::open_writer(Side::Client, Box::new(gate.clone()))
            .unwrap()
            .with_backlog(16);
        // A first record, big enough to reach the sink (the writer blocks on it), then 16
        // more waiting in the queue: the backlog is full.
        let mut first = audit.record(Event::Query);
        first.reason = Some("x".repeat(10_000));
        audit.emit(first);
        assert!(
            gate.wait_blocked(Duration::from_secs(5)),
            "the writer never took it"
        );
        assert!(audit.tx.is_empty());
        for _ in 0..16 {
            assert!(audit.admit_query());
            audit.emit(audit.record(Event::Query));
        }
        for _ in 0..3 {
            assert!(!audit.admit_query(), "refused while 16 records wait");
        }
        assert_eq!(audit.metrics().snapshot().queries_shed, 3);
        gate.open();
        // Everything queued is written before the flush returns: the sink has caught up. (Waiting
        // only until the queue fell below 16 raced: the summary record itself filled it again,
        // and the second query was refused.)
        audit.flush();
        assert!(audit.tx.is_empty(), "the sink did not drain");
        assert!(audit.admit_query(), "admitted once the sink caught up");
        assert!(audit.admit_query(), "and the summary is written once");
        audit.flush();
        let lines = gate.lines();
        assert_eq!(lines.len(), 1 + 16 + 1, "every record written");
        let summary = lines.last().unwrap();
        assert_eq!(summary["event"], "audit_backlog");
        assert_eq!(summary["outcome"], "refused");
        assert!(
            summary["reason"]
                .as_str()
                .unwrap()
                .starts_with("3 queries refused since "),
            "{summary}"
        );
    }

    #[test]
    fn p12_a_lone_record_reaches_the_sink_without_a_flush() {
        let gate = Gate::default();
        gate.open();
        let audit = Audit::open_writer(Side::Hub, Box::new(gate.clone())).unwrap();
        for n in 1..=2 {
            audit.emit(audit.record(Event::Query));
            assert!(
                gate.wait_lines(n, Duration::from_secs(5)),
                "record {n} is still held by the writer"
            );
        }
        assert_eq!(gate.lines().len(), 2);
    }

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
