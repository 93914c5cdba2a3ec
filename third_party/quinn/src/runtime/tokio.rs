use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use tokio::{
    io::{Interest, Ready, unix::AsyncFd},
    time::{Sleep, sleep_until},
};

use super::{AsyncTimer, AsyncUdpSocket, Runtime, UdpPollHelper};

/// A Quinn runtime for Tokio
#[derive(Debug)]
pub struct TokioRuntime;

impl Runtime for TokioRuntime {
    fn new_timer(&self, t: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(sleep_until(t.into()))
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(future);
    }

    fn wrap_udp_socket(&self, sock: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        Ok(Arc::new(UdpSocket {
            inner: udp::UdpSocketState::new((&sock).into())?,
            io: register(sock, Interest::READABLE)?,
            blocked: AtomicBool::new(false),
        }))
    }

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

impl AsyncTimer for Sleep {
    fn reset(self: Pin<&mut Self>, t: Instant) {
        Self::reset(self, t.into())
    }
    fn poll(self: Pin<&mut Self>, cx: &mut Context) -> Poll<()> {
        Future::poll(self, cx)
    }
}

// Ewii patch (third_party/README.md): the socket is registered for reading only, and reading
// stops at a short batch.
//
// - Upstream registers it for writing too. Every datagram sent then raises an EPOLLOUT edge (the
//   kernel frees the sent buffer and wakes the writers' queue), and the runtime's next wait
//   returns at once for nothing: one `epoll_wait` per send. Here, writability is waited for
//   only after a send found the buffer full (`blocked`), through a second descriptor of the
//   same socket registered for writing while that wait lasts.
// - Upstream reads until `recvmmsg` fails with `EAGAIN`: one empty call per burst received. On
//   Linux a non-blocking `recvmmsg` that returns fewer datagrams than asked has emptied the
//   queue, so the readiness is cleared there. A datagram that arrives after the call raises a
//   new edge, and the runtime's tick keeps a clear from erasing an edge it already saw.
#[derive(Debug)]
struct UdpSocket {
    io: AsyncFd<std::net::UdpSocket>,
    inner: udp::UdpSocketState,
    /// A send found the socket's buffer full; cleared once it is writable again.
    blocked: AtomicBool,
}

/// How long a send waits for room when its socket's writability cannot be watched.
const BLOCKED_RETRY: Duration = Duration::from_millis(1);

/// Registers `sock` with the current runtime's reactor for `interest`.
fn register(
    sock: std::net::UdpSocket,
    interest: Interest,
) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    // SAFETY: the socket owns its descriptor, and the `AsyncFd` owns the socket until it is
    // dropped; nothing replaces it (only `get_ref` is used).
    Ok(unsafe { AsyncFd::register_with_interest(sock, interest) }?)
}

impl AsyncUdpSocket for UdpSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn super::UdpPoller>> {
        Box::pin(UdpPollHelper::new(move || {
            let socket = self.clone();
            async move {
                if !socket.blocked.load(Ordering::Acquire) {
                    return Ok(());
                }
                // Registered now, so the kernel reports the socket's writability as it is
                // (an edge already past is not lost), and deregistered when the wait ends.
                let writer = socket
                    .io
                    .get_ref()
                    .try_clone()
                    .and_then(|dup| register(dup, Interest::WRITABLE));
                match writer {
                    Ok(writer) => drop(writer.writable().await?),
                    // No descriptor or watch to spare (EMFILE, ENOSPC): an error here would
                    // end the connection's driver, which upstream's wait never does. Retry
                    // the send a little later instead.
                    Err(_) => tokio::time::sleep(BLOCKED_RETRY).await,
                }
                socket.blocked.store(false, Ordering::Release);
                Ok(())
            }
        }))
    }

    fn try_send(&self, transmit: &udp::Transmit) -> io::Result<()> {
        // Ewii patch (third_party/README.md): a send that fails is made once more, through
        // upstream's `send`, which drops and logs one that fails again. On a connected socket
        // (the Ewii Client's) the kernel reports an ICMP error about the peer on the next call,
        // and that call consumes it: upstream dropped the send that met it (a whole GSO batch),
        // so a stream of forged ICMP errors could stop every send. A send that fails for
        // another reason (a netfilter refusal, a route gone, an MTU probe too large) fails the
        // same way again: one more system call, on that path only.
        let sent = match self.inner.try_send(self.io.get_ref().into(), transmit) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                self.inner.send(self.io.get_ref().into(), transmit)
            }
            sent => sent,
        };
        match sent {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.blocked.store(true, Ordering::Release);
                Err(e)
            }
            // A send that went through: the next ones need not wait either.
            Ok(()) if self.blocked.load(Ordering::Relaxed) => {
                self.blocked.store(false, Ordering::Release);
                Ok(())
            }
            other => other,
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [udp::RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let batch = bufs.len().min(udp::BATCH_SIZE);
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            // As upstream, an error other than `WouldBlock` is retried rather than returned.
            if let Ok(Ok(n)) = guard.try_io(|io| self.inner.recv(io.get_ref().into(), bufs, meta))
            {
                if cfg!(any(target_os = "linux", target_os = "android")) && n < batch {
                    guard.clear_ready_matching(Ready::READABLE);
                }
                return Poll::Ready(Ok(n));
            }
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.gro_segments()
    }
}
