//! Audit sinks: JSON lines to stdout or a file, written by one dedicated thread so that a slow
//! disk or a full pipe never stalls a query, and order is kept.
//!
//! The Client never sends audit records over the network (P12): a SIEM collects the lines
//! from the container's stdout or from the file. An in-memory tap lets tests and the
//! quickstart read what was written.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ewii_common::audit::{AuditRecord, Event, Format, Side};
use tokio::sync::Notify;
use tokio::time::Instant;

pub mod metrics;
pub mod quiet;

pub use metrics::{Metrics, Snapshot};
pub use quiet::Source;

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
    /// A window began to hold records back: the writer looks again at when it must wake.
    Wake,
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
    /// The windows of records strangers can cause ([`emit_from`](Self::emit_from)).
    quiet: Arc<Mutex<quiet::Quiet>>,
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

impl Tap {
    fn push(&self, record: AuditRecord) {
        if let Ok(mut records) = self.records.lock() {
            records.push(record);
        }
        self.changed.notify_waiters();
    }
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
                // Said with the file and the key, for the operator to find it in the config.
                let opened = opts.open(path).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("`audit = \"file:{}\"`: {e}", path.display()),
                    )
                })?;
                Box::new(opened)
            }
            AuditOutput::Discard => Box::new(io::sink()),
        };
        Self::open_writer(side, sink)
    }

    /// Starts the writer thread for any sink.
    fn open_writer(side: Side, sink: Box<dyn Write + Send>) -> io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let quiet = Arc::new(Mutex::new(quiet::Quiet::new(side)));
        let windows = Arc::clone(&quiet);
        thread::Builder::new()
            .name("ewii-audit".into())
            .spawn(move || writer(Sink::new(sink), rx, &windows))?;
        Ok(Self {
            side,
            format: Format::Ewii,
            tx,
            tap: None,
            metrics: Arc::default(),
            backlog: DEFAULT_BACKLOG,
            shed: Arc::default(),
            quiet,
        })
    }

    /// Renders lines in `format` (the tap keeps the records themselves).
    pub fn with_format(mut self, format: Format) -> Self {
        self.format = format;
        if let Ok(mut q) = self.quiet.lock() {
            q.format = format;
        }
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
        self.record_shed("the audit sink caught up");
        true
    }

    /// The `audit_backlog` record of the queries refused since the last one, if any: written
    /// by the first query admitted once the sink caught up, and at a stop (`when` says which),
    /// so that no refusal goes untold.
    pub fn record_shed(&self, when: &str) {
        let shed = self.shed.count.swap(0, Ordering::Relaxed);
        if shed > 0 {
            let since = ewii_common::time::Timestamp(self.shed.since.load(Ordering::Relaxed));
            let mut r = self.record(Event::AuditBacklog);
            r.outcome = Some(ewii_common::audit::Outcome::Refused);
            r.reason = Some(format!(
                "{shed} queries refused since {since}: the audit sink was {} records behind",
                self.backlog
            ));
            tracing::warn!(shed, %since, "{when}; queries refused meanwhile");
            self.emit(r);
        }
    }

    /// Like [`open`](Self::open), and also keeps every record in memory for [`records`](Self::records).
    pub fn open_with_tap(side: Side, output: &AuditOutput) -> io::Result<Self> {
        let mut a = Self::open(side, output)?;
        let tap: Arc<Tap> = Arc::default();
        if let Ok(mut q) = a.quiet.lock() {
            q.tap = Some(Arc::clone(&tap));
        }
        a.tap = Some(tap);
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
        self.tap_push(record);
    }

    /// Writes one record that a stranger can cause at will (a refused handshake, a throttled
    /// enrolment) from `source`: at most [`quiet::BURST`] of them per source every
    /// [`quiet::WINDOW`] are written one by one, the rest are counted into one summary record
    /// per source and window ([`quiet`]). The metrics and the tap see every record. Whether
    /// this one was written one by one: a log line about it should follow the same rule.
    pub fn emit_from(&self, source: Source, record: AuditRecord) -> bool {
        let admitted = self.quiet.lock().map(|mut q| {
            let a = q.admit(source, &record, Instant::now());
            (a.write, q.lines(a.due), a.first_held)
        });
        let (write, due, first_held) = admitted.unwrap_or((true, Vec::new(), false));
        for line in due {
            let _ = self.tx.send(Msg::Line(line));
        }
        if first_held {
            let _ = self.tx.send(Msg::Wake);
        }
        if write {
            self.emit(record);
            return true;
        }
        self.metrics.count(&record);
        self.tap_push(record);
        false
    }

    fn tap_push(&self, record: AuditRecord) {
        if let Some(tap) = &self.tap {
            tap.push(record);
        }
    }

    /// Waits (at most 5 s) until every record emitted so far is written and flushed. Blocks
    /// the calling thread: async code uses [`flush_async`](Self::flush_async).
    pub fn flush(&self) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.tx.send(Msg::Flush(Done::Thread(tx))).is_ok()
            && rx.recv_timeout(FLUSH_BOUND).is_err()
        {
            self.unflushed();
        }
    }

    /// [`flush`](Self::flush) for async code: awaits the writer thread, never blocks a worker.
    /// Returns whether everything emitted before the call was written and flushed in time.
    pub async fn flush_async(&self) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Msg::Flush(Done::Task(tx))).is_err() {
            return false;
        }
        match tokio::time::timeout(FLUSH_BOUND, rx).await {
            Ok(done) => done.is_ok(),
            Err(_) => {
                self.unflushed();
                false
            }
        }
    }

    /// A flush ran out of time: the sink is stuck or failing. Said on stderr, since those
    /// records may never reach the sink if the process ends now.
    fn unflushed(&self) {
        tracing::error!(
            waiting = self.tx.len(),
            "the audit sink took more than {} s to take the records emitted so far; those still waiting are lost if this process ends now",
            FLUSH_BOUND.as_secs()
        );
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
        let deadline = Instant::now() + timeout;
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

/// Lines gathered into one `write`, at most about this many bytes.
const BATCH: usize = 64 * 1024;

/// The first and the longest pause between two tries of a failing sink.
const RETRY_FIRST: Duration = Duration::from_millis(10);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// The audit sink and the lines gathered for it. A write that fails (a full disk, a closed
/// pipe) is tried again, from the byte where it stopped, until it succeeds: no record is
/// dropped and none is cut or written twice. The writer thread waits meanwhile, its queue
/// grows, and [`Audit::admit_query`] refuses new queries once it holds the backlog.
struct Sink {
    out: Box<dyn Write + Send>,
    buf: Vec<u8>,
    /// The sink failed and has not recovered yet (said once per episode).
    failing: bool,
}

impl Sink {
    fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            out,
            buf: Vec::with_capacity(BATCH),
            failing: false,
        }
    }

    fn line(&mut self, line: &str) {
        self.buf.extend_from_slice(line.as_bytes());
        self.buf.push(b'\n');
        if self.buf.len() >= BATCH {
            self.flush();
        }
    }

    /// Writes and flushes everything gathered, however long the sink takes to recover.
    fn flush(&mut self) {
        let mut done = 0;
        let mut pause = RETRY_FIRST;
        loop {
            let tried = if done < self.buf.len() {
                match self.out.write(&self.buf[done..]) {
                    Ok(0) => Err(io::Error::from(io::ErrorKind::WriteZero)),
                    Ok(n) => {
                        done += n;
                        continue;
                    }
                    Err(e) => Err(e),
                }
            } else {
                self.out.flush()
            };
            match tried {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if !self.failing {
                        self.failing = true;
                        tracing::error!(error = %e, "the audit sink fails; its records are kept and written when it recovers, and new queries are refused once the backlog is full");
                    }
                    thread::sleep(pause);
                    pause = (pause * 2).min(RETRY_MAX);
                }
            }
        }
        self.buf.clear();
        if self.failing {
            self.failing = false;
            tracing::warn!("the audit sink recovered; every record kept meanwhile is written");
        }
    }
}

fn writer(mut out: Sink, rx: Receiver<Msg>, quiet: &Mutex<quiet::Quiet>) {
    let summaries = |all: bool| {
        quiet
            .lock()
            .map(|mut q| {
                let due = q.due(Instant::now(), all);
                q.lines(due)
            })
            .unwrap_or_default()
    };
    loop {
        // Awake when a window that held records back ends, to write its summary.
        let next = quiet.lock().ok().and_then(|q| q.next_due());
        let received = match next {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
        };
        let msg = match received {
            Ok(msg) => Some(msg),
            Err(RecvTimeoutError::Timeout) => None,
            // Every handle is gone: the windows still open are summed up too.
            Err(RecvTimeoutError::Disconnected) => {
                write_lines(&mut out, summaries(true));
                out.flush();
                return;
            }
        };
        write_lines(&mut out, summaries(false));
        let mut pending = msg;
        // Write everything queued, then flush once: batching without delaying a lone record.
        while let Some(msg) = pending.take() {
            match msg {
                Msg::Line(line) => out.line(&line),
                Msg::Wake => {}
                Msg::Flush(done) => {
                    // Everything emitted so far: the records held back included, as counts.
                    write_lines(&mut out, summaries(true));
                    out.flush();
                    match done {
                        Done::Thread(tx) => drop(tx.send(())),
                        Done::Task(tx) => drop(tx.send(())),
                    }
                }
            }
            pending = rx.try_recv().ok();
        }
        out.flush();
        thread::sleep(GATHER);
    }
}

fn write_lines(out: &mut Sink, lines: Vec<String>) {
    for line in lines {
        out.line(&line);
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

    /// A Client's writer, backlog 16, blocked on a closed [`Gate`] by a first record that
    /// reached it (nothing queued yet).
    fn blocked_writer() -> (Gate, Audit) {
        let gate = Gate::default();
        let audit = Audit::open_writer(Side::Client, Box::new(gate.clone()))
            .unwrap()
            .with_backlog(16);
        let mut first = audit.record(Event::Query);
        first.reason = Some("x".repeat(10_000));
        audit.emit(first);
        assert!(
            gate.wait_blocked(Duration::from_secs(5)),
            "the writer never took it"
        );
        assert!(audit.tx.is_empty());
        (gate, audit)
    }

    #[test]
    fn p11_a_blocked_sink_refuses_new_queries_and_loses_no_record() {
        // A first record reached the sink (the writer blocks on it), then 16 more wait in
        // the queue: the backlog is full.
        let (gate, audit) = blocked_writer();
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
    fn p11_queries_refused_until_a_stop_are_summed_up_at_the_stop() {
        let (gate, audit) = blocked_writer();
        for _ in 0..16 {
            audit.emit(audit.record(Event::Query));
        }
        assert!(!audit.admit_query());
        assert!(!audit.admit_query());
        // No query comes after: the stop writes the summary.
        audit.record_shed("stopping");
        audit.record_shed("stopping");
        gate.open();
        audit.flush();
        let lines = gate.lines();
        let summaries: Vec<_> = lines
            .iter()
            .filter(|l| l["event"] == "audit_backlog")
            .collect();
        assert_eq!(summaries.len(), 1, "once: {lines:?}");
        assert!(summaries[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("2 queries refused since "));
    }

    /// A sink that fails (a full disk) until it is healed, then takes at most 7 bytes per
    /// write: records must survive both, whole, in order, each once.
    /// What a [`Failing`] sink went through.
    #[derive(Default)]
    struct Failures {
        healed: bool,
        tries: usize,
        written: Vec<u8>,
    }

    #[derive(Clone, Default)]
    struct Failing(Arc<(Mutex<Failures>, Condvar)>);

    impl Failing {
        /// Waits (at most 5 s) until the writer has tried `n` times.
        fn wait_tries(&self, n: usize) -> bool {
            let (lock, cvar) = &*self.0;
            let state = lock.lock().unwrap();
            let (_state, waited) = cvar
                .wait_timeout_while(state, Duration::from_secs(5), |s| s.tries < n)
                .unwrap();
            !waited.timed_out()
        }

        fn heal(&self) {
            self.0 .0.lock().unwrap().healed = true;
        }

        fn written(&self) -> Vec<u8> {
            self.0 .0.lock().unwrap().written.clone()
        }
    }

    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, cvar) = &*self.0;
            let mut state = lock.lock().unwrap();
            if !state.healed {
                state.tries += 1;
                cvar.notify_all();
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
            let n = buf.len().min(7);
            state.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn p11_a_failing_sink_keeps_every_record_and_refuses_new_queries_until_it_recovers() {
        let sink = Failing::default();
        let audit = Audit::open_writer(Side::Client, Box::new(sink.clone()))
            .unwrap()
            .with_backlog(16);
        let emit = |i: usize| {
            let mut r = audit.record(Event::Query);
            r.reason = Some(format!("record {i}"));
            audit.emit(r);
        };
        emit(0);
        // The writer took the first record and is stuck on it; 16 more fill the backlog.
        assert!(sink.wait_tries(2), "the writer never tried");
        for i in 1..=16 {
            assert!(audit.admit_query());
            emit(i);
        }
        assert!(!audit.admit_query(), "refused while the sink fails");
        sink.heal();
        audit.flush();
        let bytes = sink.written();
        let lines: Vec<serde_json::Value> = String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a whole JSON line"))
            .collect();
        let reasons: Vec<String> = lines
            .iter()
            .map(|l| l["reason"].as_str().unwrap().to_owned())
            .collect();
        let expected: Vec<String> = (0..=16).map(|i| format!("record {i}")).collect();
        assert_eq!(reasons, expected, "every record, once, in order");
        assert!(audit.admit_query(), "admitted once the sink recovered");
    }

    /// A Hub's writer over an open [`Gate`].
    fn open_gate() -> (Gate, Audit) {
        let gate = Gate::default();
        gate.open();
        let audit = Audit::open_writer(Side::Hub, Box::new(gate.clone())).unwrap();
        (gate, audit)
    }

    /// A refused handshake from `peer`.
    fn refused_from(audit: &Audit, peer: &str) -> AuditRecord {
        let mut r = audit.record(Event::HandshakeRefused);
        r.peer = Some(peer.into());
        r.outcome = Some(Outcome::Refused);
        r.reason = Some("ALPN none without a client certificate".into());
        r
    }

    #[test]
    fn p11_a_flood_from_one_source_is_written_up_to_its_burst_then_summed_up_and_nothing_is_lost() {
        let (gate, audit) = open_gate();
        let flooder = Source::address("192.0.2.7".parse().unwrap());
        for port in 0..50 {
            audit.emit_from(
                flooder.clone(),
                refused_from(&audit, &format!("192.0.2.7:{port}")),
            );
        }
        // Two hosts of one IPv6 /64 are one source; another address is its own.
        for i in 0..6 {
            for ip in ["2001:db8::1", "2001:db8::ffff:2"] {
                let r = refused_from(&audit, &format!("[{ip}]:{i}"));
                audit.emit_from(Source::address(ip.parse().unwrap()), r);
            }
        }
        let other = Source::address("198.51.100.1".parse().unwrap());
        audit.emit_from(other, refused_from(&audit, "198.51.100.1:1"));
        audit.flush();
        let lines = gate.lines();
        let from = |prefix: &str| {
            lines
                .iter()
                .filter(|l| l["peer"].as_str().is_some_and(|p| p.starts_with(prefix)))
                .collect::<Vec<_>>()
        };
        let summary = |ls: &[&serde_json::Value]| {
            ls.iter()
                .filter_map(|l| l["reason"].as_str())
                .filter(|r| r.contains("not written one by one"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let flood = from("192.0.2.7");
        assert_eq!(flood.len(), 11, "ten one by one, one summary");
        let said = summary(&flood);
        assert_eq!(said.len(), 1);
        assert!(
            said[0].starts_with("40 more records of this event from 192.0.2.7 since "),
            "{}",
            said[0]
        );
        assert!(flood.iter().all(|l| l["event"] == "handshake_refused"));
        let v6 = from("[2001:db8::");
        assert_eq!(v6.len(), 10, "one source for the /64");
        let said = summary(&from("2001:db8::"));
        assert_eq!(said.len(), 1);
        // Its `peer` is the prefix the records came from, not one host of it.
        assert_eq!(
            from("2001:db8::/64").len(),
            1,
            "the summary's peer names the /64"
        );
        assert!(
            said[0].starts_with("2 more records of this event from 2001:db8::/64"),
            "{}",
            said[0]
        );
        assert_eq!(from("198.51.100.1").len(), 1);
        assert_eq!(lines.len(), 11 + 10 + 1 + 1);
        // Every record is counted, the ones held back too.
        assert_eq!(audit.metrics().snapshot().handshakes_refused, 63);
    }

    /// A summary keeps the outcome of what it sums up: records of one event and source held
    /// back with different outcomes (queries turned away for load, `failed`, and by policy,
    /// `refused`) are summed up apart.
    #[test]
    fn p11_a_summary_says_the_outcome_of_the_records_it_holds_back() {
        let (gate, audit) = open_gate();
        let source = Source::address("192.0.2.9".parse().unwrap());
        for (i, outcome) in std::iter::repeat_n(Outcome::Refused, 12)
            .chain(std::iter::repeat_n(Outcome::Failed, 3))
            .enumerate()
        {
            let mut r = audit.record(Event::Query);
            r.peer = Some(format!("192.0.2.9:{i}"));
            r.outcome = Some(outcome);
            audit.emit_from(source.clone(), r);
        }
        audit.flush();
        let summaries: Vec<_> = gate
            .lines()
            .into_iter()
            .filter(|l| {
                l["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("not written one by one"))
            })
            .map(|l| {
                (
                    l["outcome"].clone(),
                    l["reason"].as_str().unwrap()[..16].to_owned(),
                )
            })
            .collect();
        assert_eq!(
            summaries,
            vec![
                ("refused".into(), "2 more records o".into()),
                ("failed".into(), "3 more records o".into()),
            ]
        );
    }

    /// The summary of a federated trust domain's unlisted IDs carries the trust domain in
    /// `client`, as its SPIFFE ID, so that a SIEM finds it with the Clients of that domain; the
    /// records written one by one before it name the ID each refused certificate proved.
    #[test]
    fn p11_the_summary_of_a_trust_domains_unlisted_ids_names_the_trust_domain() {
        let (gate, audit) = open_gate();
        for i in 0..12 {
            let mut r = audit.record(Event::HandshakeRefused);
            r.client = Some(format!("spiffe://customer.test/made-up/{i}"));
            r.outcome = Some(Outcome::Refused);
            audit.emit_from(Source::Unlisted("customer.test".into()), r);
        }
        audit.flush();
        let lines = gate.lines();
        let clients: Vec<&str> = lines.iter().filter_map(|l| l["client"].as_str()).collect();
        assert_eq!(clients.len(), 11, "{lines:?}");
        assert_eq!(clients[9], "spiffe://customer.test/made-up/9");
        assert_eq!(clients[10], "spiffe://customer.test");
        let said = lines[10]["reason"].as_str().unwrap();
        assert!(
            said.starts_with(
                "2 more records of this event from the IDs of trust domain customer.test"
            ),
            "{said}"
        );
    }

    #[test]
    fn p11_a_sources_window_ends_with_its_summary_and_the_sources_tracked_are_bounded() {
        let mut q = quiet::Quiet::new(Side::Hub);
        let r = AuditRecord::new(crate::now_timestamp(), Side::Hub, Event::HandshakeRefused);
        let t0 = Instant::now();
        let ip = Source::address("192.0.2.9".parse().unwrap());
        let admitted: Vec<_> = (0..12).map(|_| q.admit(ip.clone(), &r, t0)).collect();
        let written = admitted.iter().filter(|a| a.write).count();
        assert_eq!(written, quiet::BURST as usize);
        // The first record held back, and only that one, tells the writer to look again.
        let told: Vec<bool> = admitted.iter().map(|a| a.first_held).collect();
        assert_eq!(told[10..], [true, false]);
        assert!(!told[..10].contains(&true));
        assert_eq!(q.next_due(), Some(t0 + quiet::WINDOW));
        assert!(
            q.due(t0 + quiet::WINDOW / 2, false).is_empty(),
            "the window is open"
        );
        // The next record after the window: the summary comes first, and it is written.
        let next = q.admit(ip.clone(), &r, t0 + quiet::WINDOW);
        assert!(next.write);
        assert_eq!(next.due.len(), 1);
        let said = next.due[0].reason.as_deref().unwrap_or_default();
        assert!(
            said.starts_with("2 more records of this event from 192.0.2.9"),
            "{said}"
        );
        assert_eq!(q.next_due(), None, "nothing held back in the new window");
        // Past the bound, new sources share one entry, with its own burst.
        for i in 0..2000u32 {
            let ip = Source::address(std::net::Ipv4Addr::from(0x0a00_0000 + i).into());
            q.admit(ip, &r, t0);
        }
        assert!(q.next_due().is_some(), "the shared entry held records back");
        let due = q.due(t0 + 2 * quiet::WINDOW, true);
        assert!(
            due.iter().any(|r| r
                .reason
                .as_deref()
                .is_some_and(|x| x.contains("other sources"))),
            "{due:?}"
        );
    }

    #[test]
    fn p11_a_summary_is_written_when_its_window_ends_without_a_flush_or_another_record() {
        let (gate, audit) = open_gate();
        audit.quiet.lock().unwrap().window = Duration::from_millis(300);
        let source = Source::address("192.0.2.11".parse().unwrap());
        let emit = |port: u16| {
            let r = refused_from(&audit, &format!("192.0.2.11:{port}"));
            audit.emit_from(source.clone(), r);
        };
        (0..10).for_each(emit);
        assert!(gate.wait_lines(10, Duration::from_secs(5)));
        // Written, and past its gathering pause: the writer waits again, with nothing held
        // and so no time to wake (no event says so; ten pauses are ample).
        thread::sleep(GATHER * 10);
        (10..12).for_each(emit);
        assert!(
            gate.wait_lines(11, Duration::from_secs(5)),
            "ten one by one, then the summary"
        );
        let lines = gate.lines();
        let said = lines[10]["reason"].as_str().unwrap_or_default();
        assert!(
            said.starts_with("2 more records of this event from 192.0.2.11"),
            "{said}"
        );
    }

    #[test]
    fn p12_a_lone_record_reaches_the_sink_without_a_flush() {
        let (gate, audit) = open_gate();
        for n in 1..=2 {
            audit.emit(audit.record(Event::Query));
            assert!(
                gate.wait_lines(n, Duration::from_secs(5)),
                "record {n} is still held by the writer"
            );
        }
        assert_eq!(gate.lines().len(), 2);
    }

    /// A file sink that cannot be opened says which file, as the configuration names it.
    #[test]
    fn p12_a_file_sink_that_cannot_be_opened_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("audit.jsonl");
        let Err(e) = Audit::open(Side::Client, &AuditOutput::File(path.clone())) else {
            panic!("opened a file in a missing directory");
        };
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(
            e.to_string()
                .starts_with(&format!("`audit = \"file:{}\"`: ", path.display())),
            "{e}"
        );
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
