//! The Hub's shards: one thread per shard, each running a single-threaded runtime on which
//! the connections of its QUIC endpoint live (`transport::shard`), and the accepts and queries
//! of their Clients' service listeners. The Hub's other work — admitting new connections, the
//! store watcher, webhooks, metrics — stays on the runtime that runs
//! [`Hub::run`](super::Hub::run).

use std::io;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// How long a stopping shard waits for its blocking tasks (a CA signature) before it goes.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// Running shards. Dropping them stops their threads (without waiting for them).
#[derive(Debug)]
pub(crate) struct Shards {
    handles: Vec<Handle>,
    /// Dropping a sender ends its shard's `block_on`.
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl Shards {
    /// Starts `n` shard threads, named `ewii-shard-<i>`.
    pub(crate) fn start(n: usize) -> io::Result<Self> {
        let mut shards = Self {
            handles: Vec::with_capacity(n),
            stops: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
        };
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("ewii-shard-{i}"))
                .build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            shards.handles.push(runtime.handle().clone());
            shards.stops.push(stop);
            let thread = std::thread::Builder::new()
                .name(format!("ewii-shard-{i}"))
                .spawn(move || {
                    let _ = runtime.block_on(stopped);
                    runtime.shutdown_timeout(STOP_WAIT);
                })?;
            shards.threads.push(thread);
        }
        Ok(shards)
    }

    /// The shards' runtimes, in shard order.
    pub(crate) fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Stops every shard (their tasks are dropped) and waits for the threads to end.
    pub(crate) async fn stop(mut self) {
        self.stops.clear();
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}
