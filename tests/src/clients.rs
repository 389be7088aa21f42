//! Clients for the harness's servers. Call them inside
//! [`Netns::enter`](crate::Netns::enter) on the client namespace (or create
//! the socket there): a socket lives in the namespace it was created in.

use std::{
    collections::BTreeMap,
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("connecting to {addr}")]
    Connect {
        addr: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("sending to {addr}")]
    Send {
        addr: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("receiving from {addr}")]
    Receive {
        addr: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("{addr} closed the connection before a complete response")]
    Closed { addr: SocketAddrV4 },
    #[error("{addr} answered with status {status}")]
    Status { addr: SocketAddrV4, status: u16 },
    #[error("{addr} sent a malformed response: {detail}")]
    Malformed { addr: SocketAddrV4, detail: String },
}

impl ClientError {
    /// The kind of the underlying I/O error, if there is one.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Self::Connect { source, .. }
            | Self::Send { source, .. }
            | Self::Receive { source, .. } => Some(source.kind()),
            Self::Closed { .. } | Self::Status { .. } | Self::Malformed { .. } => None,
        }
    }

    /// The peer did not answer in time (a timed-out connect, or a read that
    /// hit the timeout).
    pub fn is_timeout(&self) -> bool {
        matches!(
            self.io_kind(),
            Some(io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
        )
    }
}

/// One request on a new connection: connects, sends `GET /`, returns the
/// response body trimmed, closes. `timeout` bounds each step (connect, every
/// read and write).
pub fn http_get(addr: SocketAddrV4, timeout: Duration) -> Result<String, ClientError> {
    let mut conn = HttpConn::connect(addr, timeout)?;
    let body = conn.request(true)?;
    conn.close();
    Ok(body)
}

/// `GET /metrics` from a Prometheus endpoint at `addr` (loopback of the
/// calling thread's namespace): the page, after checking the status line
/// and the content type Prometheus expects.
pub fn scrape_metrics(addr: SocketAddrV4, timeout: Duration) -> io::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&addr.into(), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no HTTP header end in {reply:?}")))?;
    if !head.starts_with("HTTP/1.1 200")
        || !head.contains("content-type: text/plain; version=0.0.4")
    {
        return Err(io::Error::other(format!("not a metrics page: {head}")));
    }
    Ok(body.to_owned())
}

/// Like [`http_get`], from local port `source_port`, so that the same flow
/// (5-tuple) can be opened again: the connection ends with a reset (linger
/// 0), which leaves no TIME_WAIT behind to block the port.
pub fn http_get_from(
    addr: SocketAddrV4,
    source_port: u16,
    timeout: Duration,
) -> Result<String, ClientError> {
    let connect = |source| ClientError::Connect { addr, source };
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(connect)?;
    socket.set_reuse_address(true).map_err(connect)?;
    let local = SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, source_port);
    socket
        .bind(&SocketAddr::V4(local).into())
        .map_err(connect)?;
    socket
        .connect_timeout(&SocketAddr::V4(addr).into(), timeout)
        .map_err(connect)?;
    socket.set_linger(Some(Duration::ZERO)).map_err(connect)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(timeout)).map_err(connect)?;
    stream.set_write_timeout(Some(timeout)).map_err(connect)?;
    let mut conn = HttpConn {
        addr,
        reader: BufReader::new(stream),
    };
    conn.request(true)
}

/// A long-lived HTTP/1.1 keep-alive connection. It stays in the namespace it
/// was connected in and can be used later from any thread.
#[derive(Debug)]
pub struct HttpConn {
    addr: SocketAddrV4,
    reader: BufReader<TcpStream>,
}

impl HttpConn {
    /// Connects; `timeout` bounds the connect and every later read and write.
    pub fn connect(addr: SocketAddrV4, timeout: Duration) -> Result<Self, ClientError> {
        let stream = TcpStream::connect_timeout(&addr.into(), timeout)
            .map_err(|source| ClientError::Connect { addr, source })?;
        let setup = || -> io::Result<()> {
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            stream.set_nodelay(true)
        };
        setup().map_err(|source| ClientError::Connect { addr, source })?;
        Ok(Self {
            addr,
            reader: BufReader::new(stream),
        })
    }

    /// `GET /` on this connection; returns the body trimmed.
    pub fn get(&mut self) -> Result<String, ClientError> {
        self.request(false)
    }

    /// The local address of the connection (the source port the client used).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.reader.get_ref().local_addr()
    }

    /// The server this connection was opened to.
    pub fn peer(&self) -> SocketAddrV4 {
        self.addr
    }

    /// Closes the connection (FIN, not RST).
    pub fn close(self) {
        // The peer may have closed first; either way the socket is released
        // when `self` drops.
        let _ = self.reader.get_ref().shutdown(Shutdown::Both);
    }

    fn request(&mut self, close: bool) -> Result<String, ClientError> {
        let addr = self.addr;
        let connection = if close { "close" } else { "keep-alive" };
        let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: {connection}\r\n\r\n");
        self.reader
            .get_mut()
            .write_all(request.as_bytes())
            .map_err(|source| ClientError::Send { addr, source })?;
        read_response(&mut self.reader, addr)
    }
}

fn read_line(reader: &mut impl BufRead, addr: SocketAddrV4) -> Result<String, ClientError> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => Err(ClientError::Closed { addr }),
        Ok(_) => Ok(line.trim_end_matches(['\r', '\n']).to_owned()),
        Err(source) => Err(ClientError::Receive { addr, source }),
    }
}

fn read_response(reader: &mut impl BufRead, addr: SocketAddrV4) -> Result<String, ClientError> {
    let malformed = |detail: String| ClientError::Malformed { addr, detail };
    let status_line = read_line(reader, addr)?;
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| malformed(format!("status line {status_line:?}")))?;

    let mut content_length = None;
    loop {
        let header = read_line(reader, addr)?;
        if header.is_empty() {
            break;
        }
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| malformed(format!("header {header:?}")))?;
        if name.trim().eq_ignore_ascii_case("content-length") {
            let length = value
                .trim()
                .parse::<u64>()
                .map_err(|_| malformed(format!("header {header:?}")))?;
            content_length = Some(length);
        }
    }
    let length = content_length.ok_or_else(|| malformed("no Content-Length".to_owned()))?;

    let mut body = Vec::new();
    reader
        .take(length)
        .read_to_end(&mut body)
        .map_err(|source| ClientError::Receive { addr, source })?;
    if u64::try_from(body.len()).ok() != Some(length) {
        return Err(ClientError::Closed { addr });
    }
    if status != 200 {
        return Err(ClientError::Status { addr, status });
    }
    String::from_utf8(body)
        .map(|body| body.trim().to_owned())
        .map_err(|_| malformed("body is not UTF-8".to_owned()))
}

/// Sends one datagram from `socket` to `to` and waits (at most `timeout`) for
/// one reply. Returns the reply trimmed and its source address, which is
/// what the client sees (the VIP when the reply was reverse-NATed).
pub fn udp_exchange(
    socket: &UdpSocket,
    to: SocketAddrV4,
    timeout: Duration,
) -> Result<(String, SocketAddr), ClientError> {
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|source| ClientError::Receive { addr: to, source })?;
    socket
        .send_to(b"ping\n", to)
        .map_err(|source| ClientError::Send { addr: to, source })?;
    let mut buf = [0u8; 2048];
    let (len, from) = socket
        .recv_from(&mut buf)
        .map_err(|source| ClientError::Receive { addr: to, source })?;
    let body = std::str::from_utf8(&buf[..len]).map_err(|_| ClientError::Malformed {
        addr: to,
        detail: "reply is not UTF-8".to_owned(),
    })?;
    Ok((body.trim().to_owned(), from))
}

/// How many times each body was seen, e.g. `{"backend1": 50, "backend2": 50}`.
pub fn tally<S: Into<String>>(bodies: impl IntoIterator<Item = S>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for body in bodies {
        *counts.entry(body.into()).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDR: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 80);

    #[test]
    fn parses_a_response_and_leaves_the_next_one() {
        let mut input: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nb1\nHTTP/1.1";
        assert_eq!(read_response(&mut input, ADDR).expect("response"), "b1");
        assert_eq!(input, b"HTTP/1.1");
    }

    #[test]
    fn reports_status_truncation_and_garbage() {
        let mut status: &[u8] = b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(
            read_response(&mut status, ADDR),
            Err(ClientError::Status { status: 503, .. })
        ));
        let mut short: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nb1\n";
        assert!(matches!(
            read_response(&mut short, ADDR),
            Err(ClientError::Closed { .. })
        ));
        let mut garbage: &[u8] = b"SSH-2.0-OpenSSH\r\n";
        assert!(matches!(
            read_response(&mut garbage, ADDR),
            Err(ClientError::Malformed { .. })
        ));
    }

    #[test]
    fn tally_counts_bodies() {
        let counts = tally(["b1", "b2", "b1"]);
        assert_eq!(counts.get("b1"), Some(&2));
        assert_eq!(counts.get("b2"), Some(&1));
    }
}
