//! Streaming WAL: `XLogData`, keepalives, standby status updates and the end of a timeline.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use klio_pg::{Lsn, TimeLineId};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use crate::connection::{QueryResult, ReplicationConnection, next_timeline, unexpected};
use crate::error::Error;
use crate::wire::Backend;

/// Microseconds between the Unix epoch and PostgreSQL's, 2000-01-01.
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// The length of an `XLogData` header: tag, start, end of WAL, send time.
const XLOG_DATA_HEADER: usize = 1 + 8 + 8 + 8;
/// The length of a primary keepalive: tag, end of WAL, send time, reply requested.
const KEEPALIVE_LEN: usize = 1 + 8 + 8 + 1;

/// One message of a physical replication stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamMessage {
    /// WAL bytes starting at `start`; `wal_end` is the end of WAL on the server.
    XLogData {
        start: Lsn,
        wal_end: Lsn,
        data: Bytes,
    },
    /// The server is alive; answer with [`ReplicationStream::send_status`] when
    /// `reply_requested` (or the server ends the connection after `wal_sender_timeout`).
    Keepalive { wal_end: Lsn, reply_requested: bool },
    /// The server ended streaming (`CopyDone`): the timeline ended (after promotion, for a
    /// historic timeline) or the server is shutting down. Call
    /// [`ReplicationStream::finish_timeline`] next.
    EndOfStream,
}

impl StreamMessage {
    /// Decodes the payload of a `CopyData` message from a walsender (`w` or `k`).
    pub fn parse(mut data: Bytes) -> Result<StreamMessage, Error> {
        match data.first() {
            Some(b'w') => {
                if data.len() < XLOG_DATA_HEADER {
                    return Err(Error::protocol(format!(
                        "XLogData message too short ({} bytes)",
                        data.len()
                    )));
                }
                data.advance(1);
                let start = Lsn(data.get_u64());
                let wal_end = Lsn(data.get_u64());
                let _send_time = data.get_i64();
                if start.0.checked_add(data.len() as u64).is_none() {
                    return Err(Error::protocol(format!(
                        "XLogData at {start} runs past the end of WAL space"
                    )));
                }
                Ok(StreamMessage::XLogData {
                    start,
                    wal_end,
                    data,
                })
            }
            Some(b'k') => {
                if data.len() < KEEPALIVE_LEN {
                    return Err(Error::protocol(format!(
                        "keepalive message too short ({} bytes)",
                        data.len()
                    )));
                }
                data.advance(1);
                let wal_end = Lsn(data.get_u64());
                let _send_time = data.get_i64();
                let reply_requested = data.get_u8() != 0;
                Ok(StreamMessage::Keepalive {
                    wal_end,
                    reply_requested,
                })
            }
            Some(&tag) => Err(Error::protocol(format!(
                "unknown streaming message type '{}'",
                char::from(tag)
            ))),
            None => Err(Error::protocol("empty CopyData message")),
        }
    }
}

/// The current time in microseconds since 2000-01-01, as the protocol wants it.
fn pg_now_micros() -> i64 {
    let since_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_unix.as_micros()).unwrap_or(i64::MAX) - PG_EPOCH_OFFSET_MICROS
}

/// Encodes a standby status update (`r`).
fn status_update(write: Lsn, flush: Lsn, apply: Lsn, reply_requested: bool, now: i64) -> Bytes {
    let mut msg = BytesMut::with_capacity(1 + 8 * 4 + 1);
    msg.put_u8(b'r');
    msg.put_u64(write.0);
    msg.put_u64(flush.0);
    msg.put_u64(apply.0);
    msg.put_i64(now);
    msg.put_u8(u8::from(reply_requested));
    msg.freeze()
}

#[derive(Debug)]
enum State {
    /// In COPY BOTH mode, the server still sending.
    Streaming,
    /// The server sent `CopyDone`; we have not answered yet.
    ServerDone,
    /// The server never entered COPY mode (the requested historic timeline ends at the start
    /// point) and already said which timeline is next.
    Skipped(Option<(TimeLineId, Lsn)>),
}

/// A connection in streaming mode after [`ReplicationConnection::start_physical`].
pub struct ReplicationStream {
    conn: ReplicationConnection,
    state: State,
}

impl std::fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl ReplicationStream {
    pub(crate) fn streaming(conn: ReplicationConnection) -> ReplicationStream {
        ReplicationStream {
            conn,
            state: State::Streaming,
        }
    }

    pub(crate) fn skipped(
        conn: ReplicationConnection,
        next: Option<(TimeLineId, Lsn)>,
    ) -> ReplicationStream {
        ReplicationStream {
            conn,
            state: State::Skipped(next),
        }
    }

    /// Turns a backend message into a stream message.
    fn handle(&mut self, message: Backend) -> Result<StreamMessage, Error> {
        match message {
            Backend::Message(Message::CopyData(body)) => StreamMessage::parse(body.into_bytes()),
            Backend::Message(Message::CopyDone) => {
                self.state = State::ServerDone;
                Ok(StreamMessage::EndOfStream)
            }
            Backend::Message(Message::ErrorResponse(body)) => Err(self.conn.wire.error(&body)),
            other => Err(unexpected(&other, "while streaming")),
        }
    }

    /// The next message from the server. Cancel-safe: when the future is dropped before
    /// completing, no message is lost (it stays in the read buffer). After the server ended
    /// streaming, returns [`StreamMessage::EndOfStream`] again.
    pub async fn next_message(&mut self) -> Result<StreamMessage, Error> {
        if !matches!(self.state, State::Streaming) {
            return Ok(StreamMessage::EndOfStream);
        }
        let message = self.conn.wire.read().await?;
        self.handle(message)
    }

    /// A message already completely in the read buffer, without waiting (to batch what
    /// arrived together). `None` when nothing complete is buffered or streaming has ended;
    /// the server's `CopyDone` is returned once as [`StreamMessage::EndOfStream`].
    pub fn try_next_buffered(&mut self) -> Result<Option<StreamMessage>, Error> {
        if !matches!(self.state, State::Streaming) {
            return Ok(None);
        }
        match self.conn.wire.try_parse()? {
            Some(message) => self.handle(message).map(Some),
            None => Ok(None),
        }
    }

    /// Sends a standby status update (`write`, `flush` and `apply` positions; `flush` moves a
    /// physical slot's `restart_lsn`) and flushes the socket.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), Error> {
        if let State::Skipped(_) = self.state {
            return Err(Error::protocol(
                "cannot send a status update: the server did not start streaming",
            ));
        }
        let payload = status_update(write, flush, apply, reply_requested, pg_now_micros());
        frontend::CopyData::new(payload)
            .map_err(|e| Error::protocol(format!("cannot encode status update: {e}")))?
            .write(&mut self.conn.wire.write_buf);
        self.conn.wire.flush().await
    }

    /// Leaves streaming mode and returns the connection, ready for another command (such as
    /// `START_REPLICATION` on the next timeline), with the next timeline and where it starts
    /// if the server said so (it does at the end of a historic timeline).
    ///
    /// Call it after [`StreamMessage::EndOfStream`]. Called while the server is still
    /// streaming, it ends streaming from our side: WAL still in flight is discarded.
    pub async fn finish_timeline(
        self,
    ) -> Result<(Option<(TimeLineId, Lsn)>, ReplicationConnection), Error> {
        let ReplicationStream { mut conn, state } = self;
        let server_streaming = match state {
            State::Skipped(next) => return Ok((next, conn)),
            State::Streaming => true,
            State::ServerDone => false,
        };
        frontend::copy_done(&mut conn.wire.write_buf);
        conn.wire.flush().await?;
        if server_streaming {
            loop {
                match conn.wire.read().await? {
                    Backend::Message(Message::CopyData(_)) => {}
                    Backend::Message(Message::CopyDone) => break,
                    Backend::Message(Message::ErrorResponse(body)) => {
                        return Err(conn.wire.error(&body));
                    }
                    other => return Err(unexpected(&other, "while ending streaming")),
                }
            }
        }
        let mut result = QueryResult {
            columns: Vec::new(),
            rows: Vec::new(),
        };
        let mut error = None;
        loop {
            match conn.wire.read().await? {
                Backend::Message(Message::RowDescription(body)) => {
                    result.columns = crate::connection::row_description(&body)?;
                }
                Backend::Message(Message::DataRow(body)) => {
                    result.rows.push(crate::connection::data_row(&body)?)
                }
                Backend::Message(Message::CommandComplete(_)) => {}
                Backend::Message(Message::ErrorResponse(body)) => {
                    error = Some(conn.wire.error(&body))
                }
                Backend::Message(Message::ReadyForQuery(_)) => break,
                other => return Err(unexpected(&other, "after streaming ended")),
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        Ok((next_timeline(&result)?, conn))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_xlog_data_splits_header_and_wal() {
        let mut msg = BytesMut::new();
        msg.put_u8(b'w');
        msg.put_u64(0x0100_0000);
        msg.put_u64(0x0200_0000);
        msg.put_i64(12345);
        msg.put_slice(b"walbytes");
        let parsed = StreamMessage::parse(msg.freeze()).expect("valid XLogData");
        assert_eq!(
            parsed,
            StreamMessage::XLogData {
                start: Lsn(0x0100_0000),
                wal_end: Lsn(0x0200_0000),
                data: Bytes::from_static(b"walbytes")
            }
        );
    }

    #[test]
    fn parse_keepalive_and_garbage() {
        let mut msg = BytesMut::new();
        msg.put_u8(b'k');
        msg.put_u64(42);
        msg.put_i64(0);
        msg.put_u8(1);
        assert_eq!(
            StreamMessage::parse(msg.freeze()).expect("valid keepalive"),
            StreamMessage::Keepalive {
                wal_end: Lsn(42),
                reply_requested: true
            }
        );
        for bad in [&b""[..], b"w", b"k\0\0", b"x123"] {
            assert!(matches!(
                StreamMessage::parse(Bytes::copy_from_slice(bad)),
                Err(Error::Protocol(_))
            ));
        }
        let mut overflow = BytesMut::new();
        overflow.put_u8(b'w');
        overflow.put_u64(u64::MAX);
        overflow.put_u64(0);
        overflow.put_i64(0);
        overflow.put_slice(b"x");
        assert!(StreamMessage::parse(overflow.freeze()).is_err());
    }

    #[test]
    fn status_update_layout() {
        let msg = status_update(Lsn(1), Lsn(2), Lsn(3), true, 7);
        assert_eq!(msg.len(), 34);
        assert_eq!(msg[0], b'r');
        assert_eq!(&msg[1..9], &1u64.to_be_bytes());
        assert_eq!(&msg[9..17], &2u64.to_be_bytes());
        assert_eq!(&msg[17..25], &3u64.to_be_bytes());
        assert_eq!(&msg[25..33], &7i64.to_be_bytes());
        assert_eq!(msg[33], 1);
        assert!(pg_now_micros() > 700_000_000_000_000);
    }
}
