//! The throughput benchmark's load generator and backend servers: TCP
//! connections per second (connect, one request, one response, close),
//! request/response latency over kept-alive connections, and UDP packets per
//! second counted where they arrive.
//!
//! Every loop is bounded by a deadline and a count; every socket operation
//! has a timeout. Sockets belong to the namespace of the thread that creates
//! them, so the client side runs inside [`Netns::enter`] (threads spawned
//! there inherit the namespace).
//!
//! The protocol is fixed-size: the client writes [`MESSAGE`] bytes whose
//! first byte is [`CLOSE`] or [`KEEP`], the server answers [`MESSAGE`] bytes
//! and, after `CLOSE`, closes first (as an HTTP/1.0 server does), so the
//! TIME_WAIT states stay on the backends and the client's ports are free
//! again at once.

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::netns::Netns;

/// Bytes of a request and of a response.
pub const MESSAGE: usize = 64;
/// First request byte: answer, then close.
pub const CLOSE: u8 = b'C';
/// First request byte: answer and wait for the next request.
pub const KEEP: u8 = b'K';
/// Every socket operation gives up after this.
const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a stopping server notices.
const POLL: Duration = Duration::from_millis(20);

/// p50, p90 and p99 of `values` (nearest rank: the smallest value with at
/// least p% of the values at or below it); zeros if there are none.
pub fn percentiles(values: &mut [u32]) -> [u32; 3] {
    if values.is_empty() {
        return [0; 3];
    }
    values.sort_unstable();
    [50, 90, 99].map(|p| {
        // ceil(p/100 × n), 1-based.
        let rank = (p * values.len()).div_ceil(100).max(1);
        values[rank - 1]
    })
}

/// What a TCP measurement saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TcpStats {
    /// Completed exchanges (connections for the connection test, requests
    /// for the latency test).
    pub ok: u64,
    pub errors: u64,
    pub seconds: f64,
    /// Latency of each exchange in µs, p50/p90/p99.
    pub p50_us: u32,
    pub p90_us: u32,
    pub p99_us: u32,
}

impl TcpStats {
    pub fn per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.ok as f64 / self.seconds
        } else {
            0.0
        }
    }

    fn from_workers(results: Vec<(u64, Vec<u32>)>, seconds: f64) -> Self {
        let mut ok = 0;
        let mut errors = 0;
        let mut latencies = Vec::new();
        for (errs, lat) in results {
            errors += errs;
            ok += lat.len() as u64;
            latencies.extend(lat);
        }
        let [p50_us, p90_us, p99_us] = percentiles(&mut latencies);
        Self {
            ok,
            errors,
            seconds,
            p50_us,
            p90_us,
            p99_us,
        }
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// One connection: connect, request, response, the server's close, close.
fn one_connection(target: SocketAddrV4) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(target), IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut request = [0u8; MESSAGE];
    request[0] = CLOSE;
    stream.write_all(&request)?;
    let mut response = [0u8; MESSAGE];
    stream.read_exact(&mut response)?;
    // The server closes first: wait for its FIN, bounded by the read timeout.
    let mut rest = [0u8; 1];
    match stream.read(&mut rest)? {
        0 => Ok(()),
        _ => Err(io::Error::other("the server sent more than one response")),
    }
}

/// Connections per second: `workers` threads each open connections one
/// after another for `duration` (at most `max_per_worker` each).
pub fn connection_rate(
    target: SocketAddrV4,
    workers: usize,
    duration: Duration,
    max_per_worker: usize,
) -> TcpStats {
    let start = Instant::now();
    let deadline = start + duration;
    let results = thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(move || {
                    let mut errors = 0u64;
                    let mut latencies = Vec::with_capacity(max_per_worker.min(1 << 16));
                    while Instant::now() < deadline && latencies.len() < max_per_worker {
                        let t = Instant::now();
                        match one_connection(target) {
                            Ok(()) => latencies.push(micros(t.elapsed())),
                            Err(_) => errors += 1,
                        }
                    }
                    (errors, latencies)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect::<Vec<_>>()
    });
    TcpStats::from_workers(results, start.elapsed().as_secs_f64())
}

/// Request/response latency: `conns` kept-alive connections, each asking
/// again as soon as it has its answer, for `duration` (at most
/// `max_per_conn` requests each).
pub fn request_latency(
    target: SocketAddrV4,
    conns: usize,
    duration: Duration,
    max_per_conn: usize,
) -> TcpStats {
    let start = Instant::now();
    let deadline = start + duration;
    let results = thread::scope(|scope| {
        let handles: Vec<_> = (0..conns)
            .map(|_| {
                scope.spawn(move || {
                    let mut latencies = Vec::with_capacity(max_per_conn.min(1 << 18));
                    let run = |latencies: &mut Vec<u32>| -> io::Result<()> {
                        let mut stream =
                            TcpStream::connect_timeout(&SocketAddr::V4(target), IO_TIMEOUT)?;
                        stream.set_read_timeout(Some(IO_TIMEOUT))?;
                        stream.set_write_timeout(Some(IO_TIMEOUT))?;
                        stream.set_nodelay(true)?;
                        let mut request = [0u8; MESSAGE];
                        request[0] = KEEP;
                        let mut response = [0u8; MESSAGE];
                        while Instant::now() < deadline && latencies.len() < max_per_conn {
                            let t = Instant::now();
                            stream.write_all(&request)?;
                            stream.read_exact(&mut response)?;
                            latencies.push(micros(t.elapsed()));
                        }
                        Ok(())
                    };
                    let errors = u64::from(run(&mut latencies).is_err());
                    (errors, latencies)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect::<Vec<_>>()
    });
    TcpStats::from_workers(results, start.elapsed().as_secs_f64())
}

/// What a UDP flood sent.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UdpSent {
    pub sent: u64,
    /// Sends the kernel refused (a full queue: ENOBUFS/EAGAIN).
    pub refused: u64,
    pub seconds: f64,
}

/// Sends `MESSAGE`-byte datagrams to `target` from `workers` sockets (one
/// source port each) as fast as they go, for `duration` and at most
/// `max_per_worker` each.
pub fn udp_flood(
    target: SocketAddrV4,
    workers: usize,
    duration: Duration,
    max_per_worker: u64,
) -> io::Result<UdpSent> {
    let sockets: Vec<UdpSocket> = (0..workers)
        .map(|_| {
            let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
            s.connect(target)?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            Ok(s)
        })
        .collect::<io::Result<_>>()?;
    let start = Instant::now();
    let deadline = start + duration;
    let per_worker = thread::scope(|scope| {
        let handles: Vec<_> = sockets
            .iter()
            .map(|socket| {
                scope.spawn(move || {
                    let mut batch = Batch::new(BATCH);
                    let (mut sent, mut refused) = (0u64, 0u64);
                    while sent + refused < max_per_worker && Instant::now() < deadline {
                        match batch.send(socket) {
                            Ok(n) => sent += n as u64,
                            Err(_) => refused += 1,
                        }
                    }
                    (sent, refused)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect::<Vec<_>>()
    });
    let seconds = start.elapsed().as_secs_f64();
    Ok(UdpSent {
        sent: per_worker.iter().map(|w| w.0).sum(),
        refused: per_worker.iter().map(|w| w.1).sum(),
        seconds,
    })
}

/// Datagrams per `sendmmsg`/`recvmmsg` call: one system call per datagram
/// would make the generator, not the path under test, the bottleneck.
const BATCH: usize = 32;

/// `BATCH` message headers over one buffer each, for `sendmmsg` (every
/// datagram the same [`MESSAGE`] bytes) and `recvmmsg`.
struct Batch {
    buffers: Vec<[u8; 2048]>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers in `iovecs` and `headers` point into `buffers`
// and `iovecs`, heap allocations owned by the same value that never move
// while it lives; nothing else aliases them.
unsafe impl Send for Batch {}

impl Batch {
    fn new(n: usize) -> Self {
        let mut buffers = vec![[0x5au8; 2048]; n];
        let mut iovecs: Vec<libc::iovec> = buffers
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let headers = iovecs
            .iter_mut()
            .map(|iov| {
                // SAFETY: mmsghdr is plain data; all-zero is a valid value
                // (no name, no control data, no flags).
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        Self {
            buffers,
            iovecs,
            headers,
        }
    }

    /// Sends `MESSAGE` bytes from every buffer on the connected `socket`;
    /// returns how many datagrams went.
    fn send(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        for iov in &mut self.iovecs {
            iov.iov_len = MESSAGE;
        }
        // SAFETY: `headers` holds `len` valid mmsghdr whose iovecs point into
        // `buffers`, alive and unmoved for the call; the socket is connected,
        // so no address is needed.
        let n = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                self.headers.len() as libc::c_uint,
                0,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Receives up to a batch (waiting, within the socket's timeout, for the
    /// first datagram only); returns how many arrived.
    fn receive(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        for (iov, buffer) in self.iovecs.iter_mut().zip(&self.buffers) {
            iov.iov_len = buffer.len();
        }
        // SAFETY: as in `send`; the kernel writes at most `iov_len` bytes
        // into each buffer, which we own.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                self.headers.len() as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

/// A backend for the TCP measurements: `threads` threads share one listener,
/// each serving one connection at a time with the fixed-size protocol (no
/// thread is started per connection, which would cost more than the load
/// balancer under test). Stopped on drop.
pub struct TcpBackend {
    listener: Arc<TcpListener>,
    stopping: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl TcpBackend {
    pub fn start(ns: &Netns, addr: Ipv4Addr, port: u16, threads: usize) -> io::Result<Self> {
        let listener = Arc::new(ns.enter(|| TcpListener::bind(SocketAddrV4::new(addr, port)))?);
        let stopping = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let threads = (0..threads)
            .map(|i| {
                let (listener, stopping, served) = (
                    Arc::clone(&listener),
                    Arc::clone(&stopping),
                    Arc::clone(&served),
                );
                thread::Builder::new()
                    .name(format!("tcp backend {addr} {i}"))
                    .spawn(move || {
                        while !stopping.load(Ordering::SeqCst) {
                            let Ok((stream, _)) = listener.accept() else {
                                // Woken by stop, or a transient error: do not spin.
                                thread::sleep(POLL);
                                continue;
                            };
                            // A client giving up mid-exchange is its own business.
                            let _ = serve(stream, &stopping, &served);
                        }
                    })
            })
            .collect::<io::Result<_>>()?;
        Ok(Self {
            listener,
            stopping,
            served,
            threads,
        })
    }

    /// Requests answered.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }
}

fn serve(mut stream: TcpStream, stopping: &AtomicBool, served: &AtomicU64) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let response = [0x42u8; MESSAGE];
    let mut request = [0u8; MESSAGE];
    while !stopping.load(Ordering::SeqCst) {
        match stream.read_exact(&mut request) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        stream.write_all(&response)?;
        served.fetch_add(1, Ordering::Relaxed);
        if request[0] != KEEP {
            return stream.shutdown(Shutdown::Write);
        }
    }
    Ok(())
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // SAFETY: the descriptor belongs to `self.listener`, alive for the
        // whole call; shutdown(2) on a listening socket wakes every thread
        // blocked in accept(2) (Linux behaviour), which then sees `stopping`.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                eprintln!("sluice-tests: a TCP backend thread panicked");
            }
        }
    }
}

/// A backend for the UDP measurement: counts the datagrams that arrive.
/// Stopped on drop.
pub struct UdpSink {
    stopping: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl UdpSink {
    pub fn start(ns: &Netns, addr: Ipv4Addr, port: u16) -> io::Result<Self> {
        let socket = ns.enter(|| {
            let s = UdpSocket::bind(SocketAddrV4::new(addr, port))?;
            s.set_read_timeout(Some(POLL))?;
            Ok::<_, io::Error>(s)
        })?;
        let stopping = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let thread = thread::Builder::new()
            .name(format!("udp sink {addr}"))
            .spawn({
                let (stopping, received) = (Arc::clone(&stopping), Arc::clone(&received));
                move || {
                    let mut batch = Batch::new(BATCH);
                    while !stopping.load(Ordering::SeqCst) {
                        if let Ok(n) = batch.receive(&socket) {
                            received.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                }
            })?;
        Ok(Self {
            stopping,
            received,
            thread: Some(thread),
        })
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            eprintln!("sluice-tests: a UDP sink thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<u32> = (1..=100).rev().collect();
        assert_eq!(percentiles(&mut v), [50, 90, 99]);
        let mut ten: Vec<u32> = (1..=10).collect();
        assert_eq!(percentiles(&mut ten), [5, 9, 10]);
        assert_eq!(percentiles(&mut [7]), [7, 7, 7]);
        assert_eq!(percentiles(&mut []), [0, 0, 0]);
    }

    /// Over loopback, in this process's namespace: what is sent in batches
    /// is received in batches, counted once each.
    #[test]
    fn batches_go_and_arrive() {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        rx.set_read_timeout(Some(POLL)).expect("timeout");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        tx.connect(rx.local_addr().expect("addr")).expect("connect");
        let mut out = Batch::new(4);
        assert_eq!(out.send(&tx).expect("sendmmsg"), 4);
        let mut got = 0;
        let mut inbox = Batch::new(8);
        while got < 4 {
            got += inbox.receive(&rx).expect("recvmmsg");
        }
        assert_eq!(got, 4);
        assert_eq!(inbox.headers[0].msg_len as usize, MESSAGE);
        assert!(inbox.receive(&rx).is_err(), "nothing more was sent");
    }

    #[test]
    fn stats_add_up_the_workers() {
        let s = TcpStats::from_workers(vec![(1, vec![10, 20]), (0, vec![30])], 2.0);
        assert_eq!((s.ok, s.errors), (3, 1));
        assert_eq!(s.per_second(), 1.5);
        assert_eq!(s.p50_us, 20);
    }

    /// The whole exchange over loopback, in this process's namespace (no
    /// interface is configured; nothing leaves the host).
    #[test]
    fn a_connection_is_one_request_and_one_response() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let SocketAddr::V4(addr) = listener.local_addr().expect("addr") else {
            panic!("v4")
        };
        let served = AtomicU64::new(0);
        let stopping = AtomicBool::new(false);
        thread::scope(|scope| {
            scope.spawn(|| {
                for _ in 0..2 {
                    let (s, _) = listener.accept().expect("accept");
                    serve(s, &stopping, &served).expect("serve");
                }
            });
            one_connection(addr).expect("a close exchange");
            let stats = request_latency(addr, 1, Duration::from_millis(100), 50);
            assert_eq!((stats.ok, stats.errors), (50, 0));
        });
        assert_eq!(served.load(Ordering::SeqCst), 51);
    }
}
