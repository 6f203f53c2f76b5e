//! Property tests of what a walsender sends: the framing of backend messages and the
//! streaming messages inside `CopyData`. A valid stream cut into any chunks decodes to
//! exactly what was sent; damaged, truncated or random bytes give an error or messages,
//! never a panic, and never a buffer beyond the message limit. `KLIO_PROPERTY_SEED` and
//! `KLIO_PROPERTY_SCALE` as in the other property tests (bench/fuzz.sh).

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

#[path = "../../pg/tests/support/property.rs"]
mod property;

use bytes::{BufMut, Bytes, BytesMut};
use klio_pg::Lsn;
use property::{Rng, scale};

use crate::StreamMessage;
use crate::wire::{decode_stream, take_message};

/// One framed backend message: tag, length (itself included), body.
fn frame(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_u32(u32::try_from(body.len() + 4).unwrap());
    out.put_slice(body);
}

/// What a generated stream is expected to decode to.
#[derive(Debug, PartialEq)]
enum Sent {
    Stream(StreamMessage),
    Other(&'static str),
    /// Notices and parameter status reports: skipped by the reader.
    Skipped,
}

fn generate(rng: &mut Rng) -> (BytesMut, Vec<Sent>) {
    let mut out = BytesMut::new();
    let mut sent = Vec::new();
    for _ in 0..rng.below(12) {
        match rng.below(7) {
            0 | 1 => {
                let start = Lsn(rng.next() >> 2);
                let wal_end = Lsn(rng.next());
                let data: Vec<u8> = (0..rng.below(300)).map(|_| rng.next() as u8).collect();
                let mut body = vec![b'w'];
                body.extend_from_slice(&start.0.to_be_bytes());
                body.extend_from_slice(&wal_end.0.to_be_bytes());
                body.extend_from_slice(&(rng.next() as i64).to_be_bytes());
                body.extend_from_slice(&data);
                frame(&mut out, b'd', &body);
                sent.push(Sent::Stream(StreamMessage::XLogData {
                    start,
                    wal_end,
                    data: Bytes::from(data),
                }));
            }
            2 => {
                let wal_end = Lsn(rng.next());
                let reply = rng.below(2) == 1;
                let mut body = vec![b'k'];
                body.extend_from_slice(&wal_end.0.to_be_bytes());
                body.extend_from_slice(&(rng.next() as i64).to_be_bytes());
                body.push(u8::from(reply));
                frame(&mut out, b'd', &body);
                sent.push(Sent::Stream(StreamMessage::Keepalive {
                    wal_end,
                    reply_requested: reply,
                }));
            }
            3 => {
                frame(&mut out, b'N', b"SNOTICE\0C00000\0Mhello\0\0");
                sent.push(Sent::Skipped);
            }
            4 => {
                frame(&mut out, b'S', b"application_name\0klio\0");
                sent.push(Sent::Skipped);
            }
            5 => {
                frame(&mut out, b'c', b"");
                sent.push(Sent::Other("CopyDone"));
            }
            _ => {
                frame(&mut out, b'C', b"START_REPLICATION\0");
                sent.push(Sent::Other("CommandComplete"));
            }
        }
    }
    (out, sent)
}

fn expected(sent: Vec<Sent>) -> Vec<Result<StreamMessage, &'static str>> {
    sent.into_iter()
        .filter_map(|s| match s {
            Sent::Stream(m) => Some(Ok(m)),
            Sent::Other(name) => Some(Err(name)),
            Sent::Skipped => None,
        })
        .collect()
}

#[test]
fn valid_streams_decode_to_what_was_sent_in_any_chunks() {
    let mut rng = Rng::seeded(0x5157_2001);
    for _ in 0..scale(3_000) {
        let (bytes, sent) = generate(&mut rng);
        let want = expected(sent);
        assert_eq!(decode_stream(bytes.clone()).unwrap(), want);
        // The same bytes arriving in random pieces, as reads from a socket do.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let n = (rng.below(40) as usize + 1).min(rest.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            while let Some(m) = take_message(&mut buf).unwrap() {
                got.push(m);
            }
        }
        assert!(buf.is_empty(), "bytes left after a whole stream");
        assert_eq!(got.len(), want.len());
    }
}

#[test]
fn damaged_truncated_or_random_streams_never_panic() {
    let mut rng = Rng::seeded(0x5157_2002);
    for _ in 0..scale(20_000) {
        let (mut bytes, _) = generate(&mut rng);
        match rng.below(4) {
            0 if !bytes.is_empty() => {
                let at = rng.below(bytes.len() as u64) as usize;
                bytes.truncate(at);
            }
            1 if !bytes.is_empty() => {
                for _ in 0..=rng.below(4) {
                    let at = rng.below(bytes.len() as u64) as usize;
                    bytes[at] ^= 1 << rng.below(8);
                }
            }
            2 => {
                bytes = (0..rng.below(200)).map(|_| rng.next() as u8).collect();
            }
            _ => {
                // Lengths at the edges: 0-3 (invalid), the limit, past it, u32::MAX.
                let tag = *[b'd', b'W', b'N', b'Z', 0u8]
                    .get(rng.below(5) as usize)
                    .unwrap();
                let len =
                    [0u32, 3, 4, 5, 64 << 20, (64 << 20) + 1, u32::MAX][rng.below(7) as usize];
                bytes.put_u8(tag);
                bytes.put_u32(len);
                bytes.put_slice(b"dk");
            }
        }
        // Ok or Err: either is fine, a panic is not (decode_stream also checks the buffer).
        let _ = decode_stream(bytes);
    }
}

#[test]
fn streaming_messages_at_the_edges_are_refused_with_a_reason() {
    for (payload, reason) in [
        (&b""[..], "empty CopyData"),
        (b"w1234567", "too short"),
        (b"k123", "too short"),
        (b"x", "unknown streaming message type"),
    ] {
        let err = StreamMessage::parse(Bytes::copy_from_slice(payload)).unwrap_err();
        assert!(err.to_string().contains(reason), "{payload:?}: {err}");
    }
    // WAL data that would run past the end of the WAL space.
    let mut body = vec![b'w'];
    body.extend_from_slice(&(u64::MAX - 2).to_be_bytes());
    body.extend_from_slice(&0u64.to_be_bytes());
    body.extend_from_slice(&0i64.to_be_bytes());
    body.extend_from_slice(b"abcd");
    let err = StreamMessage::parse(Bytes::from(body)).unwrap_err();
    assert!(
        err.to_string().contains("past the end of WAL space"),
        "{err}"
    );
    // A message claiming more than the limit is refused before it is buffered.
    let mut buf = BytesMut::new();
    buf.put_u8(b'd');
    buf.put_u32((64 << 20) + 1);
    let err = take_message(&mut buf).err().unwrap();
    assert!(err.to_string().contains("too long"), "{err}");
    assert!(buf.capacity() < 1 << 20);
}
