//! Real servers for the backends: an HTTP/1.1 keep-alive server and a UDP
//! echo-my-name server. Each answers with its name, so a client can tell
//! which backend served it.
//!
//! The listening socket is created inside the namespace (a socket stays in
//! the namespace it was created in, and so do the connections it accepts);
//! the threads serving it can then run anywhere.

use std::{
    collections::HashMap,
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// How often a stopping UDP server notices it should stop.
const UDP_POLL: Duration = Duration::from_millis(20);

/// Locks `m`, ignoring poisoning: the data are counters and registries that
/// stay consistent if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// An HTTP/1.1 server answering every request with `200 OK` and body
/// `<name>\n`, keeping connections open until the client closes them (or asks
/// `Connection: close`). One thread per connection. Stopped on drop.
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddrV4,
    name: String,
    listener: Arc<TcpListener>,
    shared: Arc<HttpShared>,
    acceptor: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct HttpShared {
    stopping: AtomicBool,
    accepted: AtomicUsize,
    requests: AtomicUsize,
    conns: Mutex<Conns>,
}

#[derive(Debug, Default)]
struct Conns {
    next_id: u64,
    /// A handle on every open connection, to shut them down on stop.
    open: HashMap<u64, TcpStream>,
    workers: Vec<JoinHandle<()>>,
    /// Source address of every accepted connection, in order.
    peers: Vec<SocketAddr>,
}

impl HttpServer {
    /// Listens on `addr:port` inside `ns`. Panics if it cannot bind.
    pub fn start(ns: &Netns, addr: Ipv4Addr, port: u16, name: &str) -> Self {
        let bind = SocketAddrV4::new(addr, port);
        let listener = ns
            .enter(|| TcpListener::bind(bind))
            .unwrap_or_else(|e| panic!("HTTP server {name}: binding {bind} in {}: {e}", ns.name()));
        let addr = match listener.local_addr() {
            Ok(SocketAddr::V4(local)) => local,
            _ => bind,
        };
        let listener = Arc::new(listener);
        let shared = Arc::new(HttpShared::default());
        let responses = Arc::new(Responses::new(name));
        let acceptor = thread::Builder::new()
            .name(format!("http {name}"))
            .spawn({
                let listener = Arc::clone(&listener);
                let shared = Arc::clone(&shared);
                move || accept_loop(&listener, &shared, &responses)
            })
            .unwrap_or_else(|e| panic!("cannot spawn a thread: {e}"));
        Self {
            addr,
            name: name.to_owned(),
            listener,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The address it listens on (with the real port if 0 was asked).
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connections accepted since start.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Requests answered (or being answered) since start.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Connections currently open (accepted and not yet closed by either side).
    pub fn open_connections(&self) -> usize {
        lock(&self.shared.conns).open.len()
    }

    /// Waits (polling, at most `timeout`) until exactly `n` connections are
    /// open; the server notices a client's close a moment after it happens.
    pub fn wait_open_connections(&self, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.open_connections() == n)
    }

    /// The source address of every accepted connection, in order: what the
    /// backend saw as the client.
    pub fn peers(&self) -> Vec<SocketAddr> {
        lock(&self.shared.conns).peers.clone()
    }

    /// Stops listening and closes every connection; returns once all the
    /// server's threads have ended. Idempotent.
    pub fn stop(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        // SAFETY: the descriptor belongs to `self.listener`, which is alive
        // for the whole call; shutdown(2) on a listening TCP socket wakes a
        // blocked accept(2), which then fails with EINVAL (Linux behaviour).
        let rc = unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if rc != 0 {
            eprintln!(
                "sluice-tests: HTTP server {}: shutting down the listener: {}",
                self.name,
                io::Error::last_os_error()
            );
        }
        if acceptor.join().is_err() {
            eprintln!("sluice-tests: HTTP server {}: acceptor panicked", self.name);
        }
        let workers = {
            let mut conns = lock(&self.shared.conns);
            for stream in conns.open.values() {
                // Wakes the worker blocked in read; it may be gone already.
                let _ = stream.shutdown(Shutdown::Both);
            }
            std::mem::take(&mut conns.workers)
        };
        for worker in workers {
            if worker.join().is_err() {
                eprintln!("sluice-tests: HTTP server {}: a worker panicked", self.name);
            }
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The two responses a server ever sends.
#[derive(Debug)]
struct Responses {
    keep_alive: Vec<u8>,
    close: Vec<u8>,
}

impl Responses {
    fn new(name: &str) -> Self {
        let body = format!("{name}\n");
        let response = |connection: &str| {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                 Connection: {connection}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        };
        Self {
            keep_alive: response("keep-alive"),
            close: response("close"),
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<HttpShared>, responses: &Arc<Responses>) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => return,
            Err(e) => {
                // ECONNABORTED, EMFILE, ...: transient; do not spin.
                eprintln!("sluice-tests: accept: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        let mut conns = lock(&shared.conns);
        let id = conns.next_id;
        conns.next_id += 1;
        conns.open.insert(id, handle);
        conns.peers.push(peer);
        conns.workers.retain(|w| !w.is_finished());
        let worker = thread::Builder::new()
            .name(format!("http conn {id}"))
            .spawn({
                let shared = Arc::clone(shared);
                let responses = Arc::clone(responses);
                move || {
                    // A client going away mid-request is not the server's problem.
                    let _ = serve(stream, &shared, &responses);
                    lock(&shared.conns).open.remove(&id);
                }
            });
        match worker {
            Ok(worker) => conns.workers.push(worker),
            Err(e) => {
                eprintln!("sluice-tests: cannot spawn a connection thread: {e}");
                conns.open.remove(&id);
            }
        }
    }
}

/// Serves requests on one connection until the client closes it, asks to,
/// or sends something that is not HTTP/1.x.
fn serve(stream: TcpStream, shared: &HttpShared, responses: &Responses) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let request_line = line.trim_end();
        if request_line.is_empty() {
            continue;
        }
        let mut close = request_line.ends_with("HTTP/1.0");
        if !request_line.contains(" HTTP/1.") {
            return Ok(());
        }

        let mut content_length = 0u64;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                let (name, value) = (name.trim(), value.trim());
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.parse().unwrap_or(0);
                } else if name.eq_ignore_ascii_case("connection") {
                    close = value.eq_ignore_ascii_case("close");
                }
            }
        }
        io::copy(&mut (&mut reader).take(content_length), &mut io::sink())?;

        let response = if close {
            &responses.close
        } else {
            &responses.keep_alive
        };
        // Counted before answering, so a client that has its answer sees it
        // counted.
        shared.requests.fetch_add(1, Ordering::SeqCst);
        writer.write_all(response)?;
        if close {
            return writer.shutdown(Shutdown::Write);
        }
    }
}

/// A UDP server answering each datagram with `<name>\n`, sent from its own
/// address to the datagram's source. Stopped on drop.
#[derive(Debug)]
pub struct UdpServer {
    addr: SocketAddrV4,
    name: String,
    shared: Arc<UdpShared>,
    worker: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct UdpShared {
    stopping: AtomicBool,
    received: AtomicUsize,
    sources: Mutex<Vec<SocketAddr>>,
}

impl UdpServer {
    /// Binds `addr:port` inside `ns`. Panics if it cannot.
    pub fn start(ns: &Netns, addr: Ipv4Addr, port: u16, name: &str) -> Self {
        let bind = SocketAddrV4::new(addr, port);
        let socket = ns
            .enter(|| {
                let socket = UdpSocket::bind(bind)?;
                socket.set_read_timeout(Some(UDP_POLL))?;
                Ok::<_, io::Error>(socket)
            })
            .unwrap_or_else(|e| panic!("UDP server {name}: binding {bind} in {}: {e}", ns.name()));
        let addr = match socket.local_addr() {
            Ok(SocketAddr::V4(local)) => local,
            _ => bind,
        };
        let shared = Arc::new(UdpShared::default());
        let reply = format!("{name}\n").into_bytes();
        let worker = thread::Builder::new()
            .name(format!("udp {name}"))
            .spawn({
                let shared = Arc::clone(&shared);
                let name = name.to_owned();
                move || udp_loop(&socket, &shared, &reply, &name)
            })
            .unwrap_or_else(|e| panic!("cannot spawn a thread: {e}"));
        Self {
            addr,
            name: name.to_owned(),
            shared,
            worker: Some(worker),
        }
    }

    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Datagrams received since start.
    pub fn received(&self) -> usize {
        self.shared.received.load(Ordering::SeqCst)
    }

    /// Waits (polling, at most `timeout`) until at least `n` datagrams have
    /// been received.
    pub fn wait_received(&self, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.received() >= n)
    }

    /// The source address of every datagram received, in order.
    pub fn sources(&self) -> Vec<SocketAddr> {
        lock(&self.shared.sources).clone()
    }

    /// Stops the server (within ~20 ms) and closes its socket. Idempotent.
    pub fn stop(&mut self) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        if worker.join().is_err() {
            eprintln!("sluice-tests: UDP server {}: worker panicked", self.name);
        }
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn udp_loop(socket: &UdpSocket, shared: &UdpShared, reply: &[u8], name: &str) {
    let mut buf = [0u8; 65536];
    while !shared.stopping.load(Ordering::SeqCst) {
        match socket.recv_from(&mut buf) {
            Ok((_, source)) => {
                shared.received.fetch_add(1, Ordering::SeqCst);
                lock(&shared.sources).push(source);
                if let Err(e) = socket.send_to(reply, source) {
                    eprintln!("sluice-tests: UDP server {name}: replying to {source}: {e}");
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                // e.g. ECONNREFUSED from an ICMP error for an earlier reply.
                eprintln!("sluice-tests: UDP server {name}: {e}");
                thread::sleep(UDP_POLL);
            }
        }
    }
}
