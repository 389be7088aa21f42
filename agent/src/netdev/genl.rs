//! Generic netlink as this module needs it: request framing, splitting datagrams into
//! messages, the ACK protocol and the request/response socket. Message types and their checked
//! parsing are `netlink-packet-core`'s and `netlink-packet-generic`'s, the socket is
//! `netlink-sys`'s; this file only strings them together and maps their errors.

use std::ffi::c_int;
use std::fmt;
use std::io;
use std::time::Duration;

use netlink_packet_core::{
    DecodeError, Emitable, ErrorMessage, NLM_F_ACK, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, NlasIterator, Parseable, ParseableParametrized,
};
use netlink_packet_generic::constants::{CTRL_ATTR_FAMILY_ID, CTRL_ATTR_MCAST_GROUPS};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_sys::{Socket, protocols::NETLINK_GENERIC};

use super::NetdevError;

/// Kernel netlink messages are at most NLMSG_GOODSIZE (about a page); dev-get answers and
/// notifications are under 100 bytes.
pub(super) const RECV_BUF_LEN: usize = 64 * 1024;
/// A kernel that does not answer a request within this time never will.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The parts of a `CTRL_CMD_GETFAMILY` reply this module reads: the family id and the
/// multicast groups. Other attributes are skipped unparsed, because `GenlCtrl`'s parser rejects
/// attribute types it does not know, and a kernel newer than the crate must not make XDP
/// features unknowable.
#[derive(Debug)]
pub(super) struct FamilyReply(pub(super) Vec<GenlCtrlAttrs>);

impl ParseableParametrized<[u8], GenlHeader> for FamilyReply {
    fn parse_with_param(buf: &[u8], _: GenlHeader) -> Result<Self, DecodeError> {
        let mut attrs = Vec::new();
        for nla in NlasIterator::new(buf) {
            let nla = nla?;
            if matches!(nla.kind(), CTRL_ATTR_FAMILY_ID | CTRL_ATTR_MCAST_GROUPS) {
                attrs.push(GenlCtrlAttrs::parse(&nla)?);
            }
        }
        Ok(Self(attrs))
    }
}

// ---------------------------------------------------------------------------------------------
// Framing

/// A malformed kernel message: the crate says what exactly, at debug level; the error keeps
/// the stable description.
fn malformed(what: &'static str) -> impl FnOnce(DecodeError) -> NetdevError {
    move |e| {
        tracing::debug!(error = %e, "{what}");
        NetdevError::Malformed { what }
    }
}

/// One generic-netlink request with NLM_F_ACK, serialised.
pub(super) fn request<F>(payload: F, family: u16, seq: u32) -> Vec<u8>
where
    F: GenlFamily + Emitable + fmt::Debug,
{
    let mut genl = GenlMessage::from_payload(payload);
    genl.set_resolved_family_id(family);
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = seq;
    // Port id 0: the kernel fills in ours.
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(genl));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// One netlink message out of a datagram: its header fields and exactly its bytes.
pub(super) struct NlMsg<'a> {
    pub(super) kind: u16,
    pub(super) seq: u32,
    pub(super) bytes: &'a [u8],
}

/// Splits a datagram into netlink messages, checking every length.
pub(super) fn split_messages(mut datagram: &[u8]) -> Result<Vec<NlMsg<'_>>, NetdevError> {
    let mut out = Vec::new();
    while !datagram.is_empty() {
        let header = NetlinkBuffer::new_checked(datagram)
            .map_err(malformed("netlink message length out of bounds"))?;
        let len = usize::try_from(header.length()).unwrap_or(usize::MAX);
        let bytes = datagram.get(..len).ok_or(NetdevError::Malformed {
            what: "netlink message length out of bounds",
        })?;
        out.push(NlMsg {
            kind: header.message_type(),
            seq: header.sequence_number(),
            bytes,
        });
        let aligned = len.checked_next_multiple_of(4).unwrap_or(usize::MAX);
        datagram = datagram.get(aligned..).unwrap_or_default();
    }
    Ok(out)
}

/// Parses one message whose generic-netlink payload is an `F`.
pub(super) fn parse_genl<F>(msg: &NlMsg<'_>) -> Result<NetlinkPayload<GenlMessage<F>>, NetdevError>
where
    F: ParseableParametrized<[u8], GenlHeader> + fmt::Debug,
{
    NetlinkMessage::<GenlMessage<F>>::deserialize(msg.bytes)
        .map(|msg| msg.payload)
        .map_err(malformed("undecodable generic-netlink message"))
}

/// An NLMSG_ERROR message: `Ok` for an ACK, the errno otherwise.
pub(super) fn ack_result(error: &ErrorMessage, op: &'static str) -> Result<(), NetdevError> {
    match error.raw_code() {
        0 => Ok(()),
        code if code < 0 => Err(NetdevError::Netlink {
            op,
            source: io::Error::from_raw_os_error(code.saturating_neg()),
        }),
        _ => Err(NetdevError::Malformed {
            what: "positive error code in NLMSG_ERROR",
        }),
    }
}

/// Takes the messages of one datagram that answer request `seq`, appending the replies. `true`
/// when the ACK (or NLMSG_DONE) ends the exchange, whether the reply was one message or several.
pub(super) fn collect_replies<F>(
    datagram: &[u8],
    seq: u32,
    op: &'static str,
    replies: &mut Vec<F>,
) -> Result<bool, NetdevError>
where
    F: ParseableParametrized<[u8], GenlHeader> + fmt::Debug,
{
    for msg in split_messages(datagram)? {
        if msg.seq != seq {
            continue; // not ours (cannot happen on a fresh socket; cheap to be sure)
        }
        match parse_genl::<F>(&msg)? {
            NetlinkPayload::Error(error) => {
                ack_result(&error, op)?;
                return Ok(true);
            }
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::InnerMessage(reply) => replies.push(reply.payload),
            _ => {}
        }
    }
    Ok(false)
}

// ---------------------------------------------------------------------------------------------
// Sockets

pub(super) fn netlink_socket() -> Result<Socket, NetdevError> {
    Socket::new(NETLINK_GENERIC).map_err(|source| NetdevError::Netlink {
        op: "socket(NETLINK_GENERIC)",
        source,
    })
}

/// One received netlink datagram.
pub(super) enum Datagram {
    /// From the kernel; this many bytes are in the buffer.
    Kernel(usize),
    /// From a user-space socket (anyone may unicast to our port id): ignored.
    Foreign,
    /// Larger than the buffer: its tail is lost.
    Truncated,
}

pub(super) fn recv(sock: &Socket, buf: &mut [u8], flags: c_int) -> io::Result<Datagram> {
    loop {
        let mut window = &mut *buf;
        // MSG_TRUNC makes netlink return the datagram's full length, so truncation is visible.
        match sock.recv_from(&mut window, flags | libc::MSG_TRUNC) {
            Ok((len, _)) if len > buf.len() => return Ok(Datagram::Truncated),
            Ok((_, from)) if from.port_number() != 0 => return Ok(Datagram::Foreign),
            Ok((len, _)) => return Ok(Datagram::Kernel(len)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A NETLINK_GENERIC socket for request/response exchanges.
pub(super) struct GenlSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl GenlSocket {
    pub(super) fn open() -> Result<Self, NetdevError> {
        let sock = netlink_socket()?;
        socket2::SockRef::from(&sock)
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|source| NetdevError::Netlink {
                op: "setsockopt(SO_RCVTIMEO)",
                source,
            })?;
        Ok(Self {
            sock,
            seq: 0,
            buf: vec![0; RECV_BUF_LEN],
        })
    }

    /// Sends `payload` to `family` and returns the payloads of the replies.
    pub(super) fn request<Q, R>(
        &mut self,
        op: &'static str,
        family: u16,
        payload: Q,
    ) -> Result<Vec<R>, NetdevError>
    where
        Q: GenlFamily + Emitable + fmt::Debug,
        R: ParseableParametrized<[u8], GenlHeader> + fmt::Debug,
    {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let msg = request(payload, family, seq);
        loop {
            match self.sock.send(&msg, 0) {
                Ok(sent) if sent == msg.len() => break,
                // Netlink datagrams are all or nothing; a short send would be a kernel bug.
                Ok(_) => {
                    let source = io::ErrorKind::WriteZero.into();
                    return Err(NetdevError::Netlink { op, source });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(NetdevError::Netlink { op, source }),
            }
        }
        let mut replies = Vec::new();
        loop {
            let len = match recv(&self.sock, &mut self.buf, 0) {
                Ok(Datagram::Kernel(len)) => len,
                Ok(Datagram::Foreign) => continue,
                Ok(Datagram::Truncated) => {
                    return Err(NetdevError::Malformed {
                        what: "netlink reply larger than the receive buffer",
                    });
                }
                Err(source) => return Err(NetdevError::Netlink { op, source }),
            };
            let datagram = self.buf.get(..len).unwrap_or_default();
            if collect_replies(datagram, seq, op, &mut replies)? {
                return Ok(replies);
            }
        }
    }
}
