//! Wire frames and the messages they carry (ALPN `ewii/1`, DESIGN §4).
//!
//! A frame is `u32` big-endian length, then that many bytes: one format-version byte and a
//! `postcard` body. The length is checked against [`MAX_FRAME`] before anything is allocated,
//! and [`decode`] answers `Ok(None)` while the buffer holds only part of a frame.
//!
//! Every byte string and list in a message is decoded without trusting the length it claims:
//! postcard's own sequence handling would pre-allocate up to 1 MiB on a claim alone.

use std::fmt;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// ALPN of a session connection (mutual TLS with an SVID).
pub const ALPN: &[u8] = b"ewii/1";
/// ALPN of an enrolment connection: the Client has no SVID yet and proves itself with a token.
pub const ENROLL_ALPN: &[u8] = b"ewii-enroll/1";
/// Protocol version carried in `Hello`.
pub const PROTOCOL_VERSION: u16 = 1;
/// Version of the frame body format. A frame with another version is refused, not guessed at.
pub const FORMAT_VERSION: u8 = 1;
/// Largest frame body (version byte included). Certificate chains and bundles fit with room.
pub const MAX_FRAME: usize = 64 * 1024;
/// Largest frame body of a [`QueryHead`]: an `Open` holds a query id, an allow-list entry name
/// (at most 63 bytes) and the requester's identity (a SPIFFE ID is at most 2048 bytes), so a
/// larger one is refused before it is buffered rather than held, up to [`MAX_FRAME`], on each
/// of a session's query streams.
pub const MAX_QUERY_HEAD: usize = 4 * 1024;
/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;
/// Most elements in any list inside a message (allow-list names, chain and bundle entries).
pub const MAX_LIST: usize = 1024;

/// The longest pause the Hub keeps between two `Renew` it serves on one session.
pub const RENEW_PAUSE_MAX: Duration = Duration::from_secs(5);

/// How long after a `Renew` the Hub served (signed, or refused on its merits) another one on
/// the same session is refused as a flood, before any signature or database work, for an SVID
/// with `left` of its life to go: [`RENEW_PAUSE_MAX`], or a quarter of `left` when that is
/// shorter (very short lifetimes). A Client asks again no sooner.
pub fn renew_pause(left: Duration) -> Duration {
    RENEW_PAUSE_MAX.min(left / 4)
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix claims more than [`MAX_FRAME`] bytes (or an encoder produced that much).
    #[error("frame of {0} bytes exceeds the maximum of {MAX_FRAME}")]
    TooLarge(usize),
    /// The length prefix claims more than this message may hold (a [`QueryHead`] larger than
    /// [`MAX_QUERY_HEAD`]).
    #[error("frame of {len} bytes exceeds this message's maximum of {max}")]
    OverLimit {
        /// What the prefix claims.
        len: usize,
        /// The message's maximum.
        max: usize,
    },
    /// The length prefix is zero: there is not even a version byte.
    #[error("empty frame")]
    Empty,
    /// The body carries a format version this build does not speak.
    #[error("unsupported frame format version {0}")]
    UnsupportedVersion(u8),
    /// The body does not decode as the expected message, or has bytes left over.
    #[error("malformed frame body")]
    Malformed,
}

/// Appends `msg` to `dst` as one frame.
pub fn encode<T: Serialize>(msg: &T, dst: &mut BytesMut) -> Result<(), FrameError> {
    let body = postcard::to_allocvec(msg).map_err(|_| FrameError::Malformed)?;
    let len = body.len() + 1;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    dst.reserve(HEADER_LEN + len);
    // `len <= MAX_FRAME` was checked above, so it fits in a u32.
    dst.put_u32(len as u32);
    dst.put_u8(FORMAT_VERSION);
    dst.extend_from_slice(&body);
    Ok(())
}

/// Encodes `msg` into a fresh buffer.
pub fn encode_to_vec<T: Serialize>(msg: &T) -> Result<BytesMut, FrameError> {
    let mut buf = BytesMut::new();
    encode(msg, &mut buf)?;
    Ok(buf)
}

/// How many bytes the frame at the start of `src` needs in total, once its header is there.
///
/// `Ok(None)` while fewer than [`HEADER_LEN`] bytes are buffered.
pub fn frame_len(src: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(header) = src.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let mut header = header;
    let len = header.get_u32() as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(Some(HEADER_LEN + len))
}

/// Takes one whole frame off the front of `src` and decodes it.
///
/// `Ok(None)` means "need more bytes": `src` is left untouched. On error the stream is
/// unusable and must be closed; `src` is left as it was.
pub fn decode<T: DeserializeOwned>(src: &mut BytesMut) -> Result<Option<T>, FrameError> {
    let Some(total) = frame_len(src)? else {
        return Ok(None);
    };
    if src.len() < total {
        return Ok(None);
    }
    let body = &src[HEADER_LEN..total];
    let (&version, body) = body.split_first().ok_or(FrameError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    let (msg, rest) = postcard::take_from_bytes(body).map_err(|_| FrameError::Malformed)?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed);
    }
    src.advance(total);
    Ok(Some(msg))
}

/// A 128-bit query identifier, chosen at random by the Hub; joins both sides' audit records.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub struct QueryId(pub u128);

impl fmt::Display for QueryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for QueryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QueryId({self})")
    }
}

/// Generic refusal codes. Details stay in the local log and audit record, never on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RefuseCode {
    /// The destination is not in the Client's allow-list.
    NotAllowed,
    /// The destination is allow-listed but could not be reached.
    Unreachable,
    /// The Client is shutting down and takes no new queries.
    ShuttingDown,
    /// The request was malformed or out of order.
    BadRequest,
    /// Enrolment was refused (unknown, used or expired token: deliberately one answer).
    EnrolmentRefused,
    /// The protocol version is not supported.
    Version,
    /// Not now; try again later: the Client takes no new query (its audit sink lags), or the
    /// Hub cannot record a presented SVID (its database refuses the write).
    Busy,
}

impl fmt::Display for RefuseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotAllowed => "not_allowed",
            Self::Unreachable => "unreachable",
            Self::ShuttingDown => "shutting_down",
            Self::BadRequest => "bad_request",
            Self::EnrolmentRefused => "enrolment_refused",
            Self::Version => "version",
            Self::Busy => "busy",
        })
    }
}

/// Limits the Hub announces in `Welcome`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Most concurrent queries the Hub will open on this session.
    pub max_concurrent_queries: u32,
    /// Idle timeout the Hub applies, in milliseconds.
    pub idle_timeout_ms: u32,
}

/// Messages on the control stream (the first bidirectional stream, opened by the Client).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Control {
    /// Client → Hub, first message.
    Hello {
        /// [`PROTOCOL_VERSION`] of the Client.
        version: u16,
        /// Names of the allow-list entries (addresses stay on the Client).
        #[serde(deserialize_with = "bounded::strings")]
        allow_list: Vec<String>,
        /// SHA-256 over the canonical allow-list, so the operator can tell two installs apart.
        #[serde(with = "bounded::bytes")]
        allow_list_digest: Vec<u8>,
        /// Build string of the Client.
        build: String,
    },
    /// Hub → Client: the session is up.
    Welcome {
        /// Hub-chosen session identifier.
        session_id: u64,
        /// Hub clock, microseconds since the epoch, for skew reporting.
        hub_time_us: u64,
        /// Limits the Hub applies.
        limits: Limits,
    },
    /// Hub → Client: the session is refused (e.g. unsupported version).
    Refused {
        /// Generic code.
        code: RefuseCode,
    },
    /// Client → Hub: sign a fresh key (DER CSR).
    Renew {
        /// The CSR in DER.
        #[serde(with = "bounded::bytes")]
        csr: Vec<u8>,
    },
    /// Hub → Client: the renewed SVID chain and the current bundle, all DER.
    Renewed {
        /// Leaf first.
        #[serde(deserialize_with = "bounded::byte_lists")]
        chain: Vec<Vec<u8>>,
        /// Trust anchors.
        #[serde(deserialize_with = "bounded::byte_lists")]
        bundle: Vec<Vec<u8>>,
    },
    /// Hub → Client: the trust bundle changed.
    BundleUpdate {
        /// Trust anchors, DER.
        #[serde(deserialize_with = "bounded::byte_lists")]
        bundle: Vec<Vec<u8>>,
    },
    /// Hub → Client: this identity is revoked.
    Revoked {
        /// Operator-supplied reason, for the Client's audit record.
        reason: String,
    },
    /// Client → Hub: the Client is leaving; `revoke` asks the Hub to revoke its identity.
    Goodbye {
        /// Whether the identity should be revoked.
        revoke: bool,
    },
    /// Either way: clock probe.
    Ping {
        /// Sender's clock, microseconds since the epoch.
        time_us: u64,
    },
    /// Answer to `Ping`.
    Pong {
        /// The `Ping`'s `time_us`, echoed.
        echo_us: u64,
        /// Responder's clock.
        time_us: u64,
    },
    /// Client → Hub: the SVID of the last `Renewed` is stored and in use; the Hub re-binds
    /// this session to `serial` and retires the older ones (P8). No second connection.
    Rotated {
        /// The renewed SVID's serial, normalised.
        serial: String,
    },
    /// Client → Hub, from a Client whose SVIDs come from its own SPIRE (a federated Client):
    /// this connection goes on with `chain`, a new SVID for the same SPIFFE ID. `proof` is
    /// the new key's TLS 1.3 signature (`scheme`, a TLS `SignatureScheme` code) over
    /// [`present_message`]: it proves the key, bound to this one connection. The Hub answers
    /// `Presented` or `Refused`; the Client then moves to a new connection instead.
    Present {
        /// Leaf first, DER.
        #[serde(deserialize_with = "bounded::byte_lists")]
        chain: Vec<Vec<u8>>,
        /// The signature scheme of `proof`.
        scheme: u16,
        /// The signature.
        #[serde(with = "bounded::bytes")]
        proof: Vec<u8>,
    },
    /// Hub → Client: the session is re-bound to the presented SVID with this serial.
    Presented {
        /// The presented SVID's serial, normalised.
        serial: String,
    },
}

/// The TLS exporter label whose output a `Present` proof signs (RFC 8446 §7.5).
pub const PRESENT_EXPORTER_LABEL: &[u8] = b"EXPORTER-ewii-present";
/// Length of the exporter output a `Present` proof signs.
pub const PRESENT_EXPORTER_LEN: usize = 32;

/// What the key of a presented SVID signs: a context string, the connection's exporter
/// output ([`PRESENT_EXPORTER_LABEL`], so a proof is good on this connection only) and the
/// leaf certificate (so it vouches for this certificate only).
pub fn present_message(exporter: &[u8; PRESENT_EXPORTER_LEN], leaf: &[u8]) -> Vec<u8> {
    const CONTEXT: &[u8] = b"ewii/1 present SVID\0";
    let mut m = Vec::with_capacity(CONTEXT.len() + exporter.len() + leaf.len());
    m.extend_from_slice(CONTEXT);
    m.extend_from_slice(exporter);
    m.extend_from_slice(leaf);
    m
}

/// Messages of an enrolment connection (ALPN [`ENROLL_ALPN`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Enrol {
    /// Client → Hub: the join token and a CSR for a key made on the Client.
    Request {
        /// The one-time join token.
        token: String,
        /// The CSR in DER.
        #[serde(with = "bounded::bytes")]
        csr: Vec<u8>,
    },
    /// Hub → Client: the issued SVID chain (leaf first) and the trust bundle, DER.
    Issued {
        /// Leaf first.
        #[serde(deserialize_with = "bounded::byte_lists")]
        chain: Vec<Vec<u8>>,
        /// Trust anchors.
        #[serde(deserialize_with = "bounded::byte_lists")]
        bundle: Vec<Vec<u8>>,
    },
    /// Hub → Client: refused, generically.
    Refused {
        /// Generic code.
        code: RefuseCode,
    },
}

/// Header of a query stream (bidirectional, opened by the Hub); raw bytes follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum QueryHead {
    /// Hub → Client: open a connection to an allow-list entry.
    Open {
        /// Joins both sides' audit records.
        query_id: QueryId,
        /// Allow-list entry *name*; the Client alone knows its address.
        destination: String,
        /// Requester identity (a SPIFFE ID, or a configured principal and peer address).
        source: String,
    },
    /// Client → Hub: connected; bytes follow.
    Opened,
    /// Client → Hub: refused; the stream ends.
    Refused {
        /// Generic code.
        code: RefuseCode,
    },
}

/// Deserializers that grow collections as elements actually arrive.
mod bounded {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};

    /// `#[serde(with = "bounded::bytes")]`: a byte string, copied from the frame it sits in.
    pub(super) mod bytes {
        use std::fmt;

        use serde::de::{self, Deserializer, Visitor};
        use serde::Serializer;

        pub(in super::super) fn serialize<S: Serializer>(
            v: &[u8],
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(v)
        }

        pub(in super::super) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Vec<u8>, D::Error> {
            struct Bytes;
            impl Visitor<'_> for Bytes {
                type Value = Vec<u8>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                    // The slice exists in the frame already, so its length is real.
                    Ok(v.to_vec())
                }
                fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                    Ok(v)
                }
            }
            d.deserialize_byte_buf(Bytes)
        }
    }

    struct ByteVec(Vec<u8>);
    impl<'de> Deserialize<'de> for ByteVec {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            bytes::deserialize(d).map(ByteVec)
        }
    }

    struct Growing<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for Growing<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a sequence")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            // Deliberately ignore `seq.size_hint()`: it is the peer's claim.
            let mut out = Vec::new();
            while let Some(item) = seq.next_element()? {
                if out.len() == super::MAX_LIST {
                    return Err(serde::de::Error::custom("list too long"));
                }
                out.push(item);
            }
            Ok(out)
        }
    }

    pub(super) fn strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        d.deserialize_seq(Growing::<String>(PhantomData))
    }

    pub(super) fn byte_lists<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let lists = d.deserialize_seq(Growing::<ByteVec>(PhantomData))?;
        Ok(lists.into_iter().map(|b| b.0).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + fmt::Debug>(msg: T) {
        let mut buf = encode_to_vec(&msg).unwrap();
        // Every strict prefix is "need more", and leaves the buffer alone.
        for cut in 0..buf.len() {
            let mut part = BytesMut::from(&buf[..cut]);
            assert_eq!(decode::<T>(&mut part).unwrap(), None, "prefix {cut}");
            assert_eq!(part.len(), cut);
        }
        buf.extend_from_slice(b"tail");
        assert_eq!(decode::<T>(&mut buf).unwrap(), Some(msg));
        assert_eq!(&buf[..], b"tail");
    }

    #[test]
    fn messages_roundtrip() {
        roundtrip(Control::Hello {
            version: PROTOCOL_VERSION,
            allow_list: vec!["db".into(), "cache".into()],
            allow_list_digest: vec![7; 32],
            build: "ewii 0.1.0".into(),
        });
        roundtrip(Control::Renewed {
            chain: vec![vec![1, 2, 3], vec![4]],
            bundle: vec![vec![9; 300]],
        });
        roundtrip(Control::Goodbye { revoke: true });
        roundtrip(Control::Rotated {
            serial: "0a1b".into(),
        });
        roundtrip(Control::Present {
            chain: vec![vec![0x30; 500], vec![0x30; 400]],
            scheme: 0x0403,
            proof: vec![5; 72],
        });
        roundtrip(Control::Presented {
            serial: "0c2d".into(),
        });
        roundtrip(QueryHead::Open {
            query_id: QueryId(u128::MAX - 5),
            destination: "db".into(),
            source: "spiffe://example.org/billing".into(),
        });
        roundtrip(QueryHead::Refused {
            code: RefuseCode::NotAllowed,
        });
        roundtrip(Enrol::Request {
            token: "t".into(),
            csr: vec![0x30; 200],
        });
    }

    #[test]
    fn a_present_proof_is_bound_to_its_connection_and_its_certificate() {
        let m = present_message(&[1; PRESENT_EXPORTER_LEN], b"leaf");
        assert_ne!(m, present_message(&[2; PRESENT_EXPORTER_LEN], b"leaf"));
        assert_ne!(m, present_message(&[1; PRESENT_EXPORTER_LEN], b"leaf2"));
        assert!(m.ends_with(b"leaf"));
    }

    #[test]
    fn oversized_and_empty_frames_are_refused_before_reading_the_body() {
        let mut buf = BytesMut::from(&((MAX_FRAME as u32) + 1).to_be_bytes()[..]);
        assert_eq!(
            decode::<Control>(&mut buf),
            Err(FrameError::TooLarge(MAX_FRAME + 1))
        );
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(decode::<Control>(&mut buf), Err(FrameError::Empty));
    }

    #[test]
    fn unknown_format_version_is_refused() {
        let mut buf = encode_to_vec(&Control::Goodbye { revoke: false }).unwrap();
        buf[HEADER_LEN] = 9;
        assert_eq!(
            decode::<Control>(&mut buf),
            Err(FrameError::UnsupportedVersion(9))
        );
    }

    #[test]
    fn trailing_bytes_inside_a_frame_are_malformed() {
        let mut buf = encode_to_vec(&Control::Goodbye { revoke: false }).unwrap();
        buf.put_u8(0);
        let len = (buf.len() - HEADER_LEN) as u32;
        buf[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        assert_eq!(decode::<Control>(&mut buf), Err(FrameError::Malformed));
    }

    #[test]
    fn encoding_refuses_messages_over_the_maximum() {
        let msg = Control::BundleUpdate {
            bundle: vec![vec![0; MAX_FRAME]],
        };
        assert!(matches!(
            encode_to_vec(&msg),
            Err(FrameError::TooLarge(n)) if n > MAX_FRAME
        ));
    }
}
