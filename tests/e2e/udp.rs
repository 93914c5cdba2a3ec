//! P5: the one QUIC connection's UDP socket. The socket glue of the vendored quinn
//! (third_party/README.md, the Ewii patch in `runtime/tokio.rs`), driven directly: the socket
//! is registered for reading only, writability is waited for only after a send found the
//! buffer full, and reading stops at a short batch instead of calling `recvmmsg` once more to
//! see it empty. Every QUIC packet of the Hub and the Client goes through this glue; these
//! tests prove the two paths the rest of the suite cannot reach or cannot tell from a delay:
//! - a send buffer that really fills (loopback frees a datagram's memory as it is sent, so
//!   the test's own network namespace holds datagrams in a slow `tbf` queue instead), and
//! - a burst larger than one batch, and a datagram that arrives after a short read: neither
//!   may wait for a later datagram to be read;
//! - bursts sent at random moments against a reader on a two-thread runtime, racing its
//!   `recvmmsg` and its clearing of the readiness: every one must be read.

use std::future::poll_fn;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit, BATCH_SIZE};
use quinn::{AsyncUdpSocket, Runtime, TokioRuntime};

use crate::netns::{in_own_netns, run, skip_or_fail};

/// Datagrams in the burst: more than one batch (`BATCH_SIZE`, 32 on Linux) and not a multiple.
const BURST: usize = 3 * BATCH_SIZE + 5;
/// Bytes of each test datagram.
const DATAGRAM: usize = 100;

fn bound() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_nonblocking(true).unwrap();
    s
}

fn transmit(to: SocketAddr, contents: &[u8]) -> Transmit<'_> {
    Transmit {
        destination: to,
        ecn: None,
        contents,
        segment_size: None,
        src_ip: None,
    }
}

/// Whether a send on `socket` may go at once: its poller is ready on the first poll, without
/// a turn of the runtime.
fn writable_now(socket: &Arc<dyn AsyncUdpSocket>) -> bool {
    let mut poller = socket.clone().create_io_poller();
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    matches!(poller.as_mut().poll_writable(&mut cx), Poll::Ready(Ok(())))
}

/// Lets the current-thread runtime run its other tasks and poll its reactor a few times
/// (a yielding task is resumed only after the reactor's non-blocking poll).
async fn reactor_turns() {
    for _ in 0..5 {
        tokio::task::yield_now().await;
    }
}

/// Reads datagrams until `bytes` arrived, each read bounded by `within`; returns the bytes
/// read, short if a read timed out.
async fn read_bytes(socket: &Arc<dyn AsyncUdpSocket>, bytes: usize, within: Duration) -> usize {
    let mut buf = vec![0u8; BATCH_SIZE * 2048];
    let mut got = 0;
    while got < bytes {
        let mut metas = [RecvMeta::default(); BATCH_SIZE];
        let mut iovs: Vec<IoSliceMut<'_>> = buf.chunks_mut(2048).map(IoSliceMut::new).collect();
        let read = tokio::time::timeout(
            within,
            poll_fn(|cx| socket.poll_recv(cx, &mut iovs, &mut metas)),
        )
        .await;
        match read {
            Ok(Ok(n)) => got += metas[..n].iter().map(|m| m.len).sum::<usize>(),
            Ok(Err(e)) => panic!("recv: {e}"),
            Err(_) => break,
        }
    }
    got
}

#[test]
fn p5_a_full_udp_send_buffer_is_waited_for_and_then_sends_again() {
    let why = in_own_netns(|| async {
        // Datagrams wait in this queue, charged to the sender's buffer, until it lets them go
        // (8 kbit/s: one of these every ~1.2 s) or is removed.
        if let Err(why) = run(
            "tc",
            &[
                "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "8kbit", "burst", "1600",
                "limit", "10000000",
            ],
        ) {
            return Some(why);
        }
        let sender = bound();
        // The smallest buffer the kernel allows (it doubles the 4 KiB asked): a few datagrams.
        socket_buffer(&sender, 4096);
        let to = bound().local_addr().unwrap();
        let socket = TokioRuntime.wrap_udp_socket(sender).unwrap();
        assert!(writable_now(&socket), "a fresh socket waits to send");

        let payload = [7u8; 1200];
        let mut sent = 0;
        let full = loop {
            match socket.try_send(&transmit(to, &payload)) {
                Ok(()) => sent += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                Err(e) => panic!("send: {e}"),
            }
            if sent > 1_000 {
                break false;
            }
        };
        assert!(full, "the send buffer never filled ({sent} datagrams sent)");
        // Full: the poller waits, and does not claim room that is not there, however often
        // the reactor looks.
        let mut poller = socket.clone().create_io_poller();
        let waiting = tokio::spawn(async move {
            tokio::time::timeout(
                Duration::from_secs(5),
                poll_fn(|cx| poller.as_mut().poll_writable(cx)),
            )
            .await
        });
        reactor_turns().await;
        assert!(
            !waiting.is_finished(),
            "the poller said writable while the buffer was full"
        );
        // The queue goes, its datagrams' memory is freed: the waiting poller is woken.
        run("tc", &["qdisc", "del", "dev", "lo", "root"]).unwrap();
        let woken = waiting.await.unwrap();
        assert!(
            matches!(woken, Ok(Ok(()))),
            "no wake-up once the buffer had room: {woken:?}"
        );
        // The wait is over for every sender: the next one does not wait at all.
        assert!(
            writable_now(&socket),
            "a send still waits after the wake-up"
        );
        socket
            .try_send(&transmit(to, &payload))
            .expect("a send after the wait");
        assert!(writable_now(&socket));
        None
    });
    skip_or_fail(why);
}

#[test]
fn p5_a_udp_burst_larger_than_a_batch_and_a_late_datagram_are_all_read() {
    let why = in_own_netns(|| async {
        let receiver = bound();
        let to = receiver.local_addr().unwrap();
        let socket = TokioRuntime.wrap_udp_socket(receiver).unwrap();
        let sender = bound();
        let datagram = [1u8; DATAGRAM];

        // More than three batches at once: a full batch must not end the reading.
        for _ in 0..BURST {
            sender.send_to(&datagram, to).unwrap();
        }
        let got = read_bytes(&socket, BURST * DATAGRAM, Duration::from_secs(2)).await;
        assert_eq!(
            got,
            BURST * DATAGRAM,
            "datagrams of the burst were left unread"
        );

        // The queue is empty now and the reader waits; a datagram sent after the short read
        // wakes it.
        let late = tokio::spawn({
            let socket = socket.clone();
            async move { read_bytes(&socket, DATAGRAM, Duration::from_secs(2)).await }
        });
        // The reader has read the queue empty and waits.
        reactor_turns().await;
        assert!(!late.is_finished());
        sender.send_to(&datagram, to).unwrap();
        assert_eq!(
            late.await.unwrap(),
            DATAGRAM,
            "a datagram after a short read was not read"
        );
        None
    });
    skip_or_fail(why);
}

/// Bursts sent in the race test, and the longest it sends (on a loaded machine it stops
/// there, having raced for that long).
const BURSTS: usize = 5_000;
const RACE_BOUND: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p5_datagrams_sent_while_the_reader_clears_its_readiness_are_all_read() {
    // A reader on a two-thread runtime, and a sender on a thread of its own that sends bursts
    // of 1 to 40 datagrams with gaps of 0 to ~50 µs: datagrams land before, during and after
    // the reader's `recvmmsg` and its clearing of the readiness. Each burst must be read
    // before the next is sent (so that no datagram is dropped for want of buffer, and a
    // stalled reader shows as a burst that never arrives).
    let receiver = bound();
    let to = receiver.local_addr().unwrap();
    let socket = TokioRuntime.wrap_udp_socket(receiver).unwrap();
    let read = Arc::new(AtomicUsize::new(0));
    let reader = tokio::spawn({
        let read = read.clone();
        async move {
            let mut buf = vec![0u8; BATCH_SIZE * 2048];
            let mut metas = [RecvMeta::default(); BATCH_SIZE];
            loop {
                let mut iovs: Vec<IoSliceMut<'_>> =
                    buf.chunks_mut(2048).map(IoSliceMut::new).collect();
                let n = poll_fn(|cx| socket.poll_recv(cx, &mut iovs, &mut metas))
                    .await
                    .unwrap();
                let bytes: usize = metas[..n].iter().map(|m| m.len).sum();
                read.fetch_add(bytes / DATAGRAM, Ordering::SeqCst);
            }
        }
    });
    let sender = std::thread::spawn(move || -> Result<usize, String> {
        let s = bound();
        let datagram = [2u8; DATAGRAM];
        let started = tokio::time::Instant::now();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut sent = 0;
        for burst in 0..BURSTS {
            for _ in 0..=next() % 40 {
                while let Err(e) = s.send_to(&datagram, to) {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "send: {e}");
                }
                sent += 1;
            }
            let waited = tokio::time::Instant::now();
            while read.load(Ordering::SeqCst) < sent {
                if waited.elapsed() > Duration::from_secs(2) {
                    return Err(format!(
                        "burst {burst}: {} of {sent} datagrams read after 2 s",
                        read.load(Ordering::SeqCst)
                    ));
                }
                std::thread::yield_now();
            }
            // A gap of 0 to ~50 µs before the next burst, spun (a sleep is too coarse).
            let gap = Duration::from_nanos(next() % 50_000);
            let from = tokio::time::Instant::now();
            while from.elapsed() < gap {
                std::hint::spin_loop();
            }
            if started.elapsed() > RACE_BOUND {
                return Ok(sent);
            }
        }
        Ok(sent)
    });
    let result = tokio::task::spawn_blocking(move || sender.join().unwrap())
        .await
        .unwrap();
    reader.abort();
    // Every burst was read in time (or the sender says which was not).
    let sent = result.unwrap();
    println!("{sent} datagrams sent and read");
}

/// Sets the socket's send buffer (`SO_SNDBUF`).
#[allow(unsafe_code)]
fn socket_buffer(s: &UdpSocket, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt on a descriptor we own, with a pointer to a live int and its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&bytes as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_SNDBUF: {}", io::Error::last_os_error());
}
