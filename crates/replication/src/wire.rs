//! The socket and the framing of protocol messages.
//!
//! Reading is cancel-safe: bytes are appended to a read buffer by `read_buf` (which either reads
//! or does not), and only whole messages are taken out of the buffer, synchronously.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::config::{Host, ReplicationConfig};
use crate::error::Error;

/// The tag of `CopyBothResponse`, which `backend::Message::parse` does not know.
const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

/// Larger messages are refused rather than buffered. Walsenders send at most 128 kB of WAL per
/// message; other replies are small.
const MAX_MESSAGE_LEN: usize = 64 << 20;

const READ_CHUNK: usize = 256 << 10;

/// A backend message as this crate sees it.
pub(crate) enum Backend {
    Message(backend::Message),
    CopyBothResponse,
}

impl Backend {
    /// A short name for "unexpected message" errors.
    pub(crate) fn describe(&self) -> &'static str {
        use backend::Message as M;
        match self {
            Backend::CopyBothResponse => "CopyBothResponse",
            Backend::Message(m) => match m {
                M::AuthenticationOk
                | M::AuthenticationCleartextPassword
                | M::AuthenticationMd5Password(_)
                | M::AuthenticationSasl(_)
                | M::AuthenticationSaslContinue(_)
                | M::AuthenticationSaslFinal(_)
                | M::AuthenticationGss
                | M::AuthenticationGssContinue(_)
                | M::AuthenticationKerberosV5
                | M::AuthenticationScmCredential
                | M::AuthenticationSspi => "Authentication",
                M::BackendKeyData(_) => "BackendKeyData",
                M::CommandComplete(_) => "CommandComplete",
                M::CopyData(_) => "CopyData",
                M::CopyDone => "CopyDone",
                M::CopyInResponse(_) => "CopyInResponse",
                M::CopyOutResponse(_) => "CopyOutResponse",
                M::DataRow(_) => "DataRow",
                M::EmptyQueryResponse => "EmptyQueryResponse",
                M::ErrorResponse(_) => "ErrorResponse",
                M::ReadyForQuery(_) => "ReadyForQuery",
                M::RowDescription(_) => "RowDescription",
                _ => "an extended-protocol message",
            },
        }
    }
}

enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.try_write(buf),
            Socket::Unix(s) => s.try_write(buf),
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A connected socket with its read and write buffers.
pub(crate) struct Wire {
    socket: Socket,
    read_buf: BytesMut,
    /// Messages are encoded here, then sent by [`Wire::flush`].
    pub(crate) write_buf: BytesMut,
    /// `host:port` or socket path, for messages.
    target: String,
    /// The role we connected as, for authentication errors.
    user: String,
}

impl Wire {
    pub(crate) async fn connect(cfg: &ReplicationConfig) -> Result<Wire, Error> {
        let target = cfg.target();
        let socket = match &cfg.host {
            Host::Tcp(host) => {
                let stream = TcpStream::connect((host.as_str(), cfg.port))
                    .await
                    .map_err(|e| Error::io(format!("connect to server \"{target}\""), e))?;
                stream
                    .set_nodelay(true)
                    .map_err(|e| Error::io(format!("set TCP_NODELAY on \"{target}\""), e))?;
                Socket::Tcp(stream)
            }
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", cfg.port));
                let stream = UnixStream::connect(&path)
                    .await
                    .map_err(|e| Error::io(format!("connect to server \"{target}\""), e))?;
                Socket::Unix(stream)
            }
        };
        Ok(Wire {
            socket,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            write_buf: BytesMut::new(),
            target,
            user: cfg.user.clone(),
        })
    }

    pub(crate) fn user(&self) -> &str {
        &self.user
    }

    /// Sends everything in the write buffer and flushes the socket.
    pub(crate) async fn flush(&mut self) -> Result<(), Error> {
        let result = async {
            self.socket.write_all(&self.write_buf).await?;
            self.socket.flush().await
        }
        .await;
        self.write_buf.clear();
        result.map_err(|e| Error::io(format!("send data to server \"{}\"", self.target), e))
    }

    /// Takes the next whole message out of the read buffer, if there is one (see
    /// [`take_message`]).
    pub(crate) fn try_parse(&mut self) -> Result<Option<Backend>, Error> {
        take_message(&mut self.read_buf)
    }

    /// The next message, reading from the socket as needed. Cancel-safe.
    pub(crate) async fn read(&mut self) -> Result<Backend, Error> {
        loop {
            if let Some(message) = self.try_parse()? {
                return Ok(message);
            }
            if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK / 4 {
                self.read_buf.reserve(READ_CHUNK);
            }
            let n = self
                .socket
                .read_buf(&mut self.read_buf)
                .await
                .map_err(|e| {
                    Error::io(format!("receive data from server \"{}\"", self.target), e)
                })?;
            if n == 0 {
                return Err(Error::io(
                    format!("receive data from server \"{}\"", self.target),
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "server closed the connection unexpectedly",
                    ),
                ));
            }
        }
    }

    /// An `ErrorResponse` as an [`Error`].
    pub(crate) fn error(&self, body: &backend::ErrorResponseBody) -> Error {
        Error::from_fields(body.fields(), &self.user)
    }
}

impl Drop for Wire {
    /// Says goodbye (`Terminate`) without blocking, so the server does not log an unexpected EOF.
    fn drop(&mut self) {
        let mut buf = BytesMut::new();
        frontend::terminate(&mut buf);
        let _ = self.socket.try_write(&buf);
    }
}

/// Takes the next whole message out of `buf`, if there is one, leaving a partial one in
/// place (the room it needs is reserved). Notices and parameter status reports are skipped
/// (notices are logged). Whatever the server sent, this returns an error or a message; a
/// message longer than [`MAX_MESSAGE_LEN`] is refused before it is buffered.
pub(crate) fn take_message(buf: &mut BytesMut) -> Result<Option<Backend>, Error> {
    loop {
        let Some(header) = backend::Header::parse(buf)
            .map_err(|e| Error::protocol(format!("invalid message header: {e}")))?
        else {
            return Ok(None);
        };
        // Header::parse guarantees len >= 4.
        let total = usize::try_from(header.len())
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        if total > MAX_MESSAGE_LEN {
            return Err(Error::protocol(format!(
                "message of type '{}' is too long ({total} bytes)",
                char::from(header.tag())
            )));
        }
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        if header.tag() == COPY_BOTH_RESPONSE_TAG {
            buf.advance(total);
            return Ok(Some(Backend::CopyBothResponse));
        }
        let message = backend::Message::parse(buf)
            .map_err(|e| {
                Error::protocol(format!(
                    "invalid message of type '{}': {e}",
                    char::from(header.tag())
                ))
            })?
            .ok_or_else(|| Error::protocol("incomplete message after a complete header"))?;
        match message {
            backend::Message::NoticeResponse(body) => log_notice(body.fields()),
            backend::Message::ParameterStatus(_) => {}
            message => return Ok(Some(Backend::Message(message))),
        }
    }
}

/// Decodes `bytes` as a walsender's output: every framed message, and every `CopyData`
/// payload as a [`StreamMessage`](crate::StreamMessage). Returns the messages decoded (the
/// streaming ones as `Ok(message)`, the others as `Err(name)`), or the first error. For the
/// property tests and the fuzz targets.
#[cfg(any(test, fuzzing))]
pub(crate) fn decode_stream(
    mut bytes: BytesMut,
) -> Result<Vec<Result<crate::StreamMessage, &'static str>>, Error> {
    let mut out = Vec::new();
    while let Some(message) = take_message(&mut bytes)? {
        out.push(match &message {
            Backend::Message(backend::Message::CopyData(body)) => Ok(crate::StreamMessage::parse(
                bytes::Bytes::copy_from_slice(body.data()),
            )?),
            other => Err(other.describe()),
        });
    }
    if bytes.capacity() > MAX_MESSAGE_LEN + READ_CHUNK {
        return Err(Error::protocol(
            "the read buffer grew past the message limit",
        ));
    }
    Ok(out)
}

fn log_notice(mut fields: backend::ErrorFields<'_>) {
    let mut severity = String::new();
    let mut message = String::new();
    while let Ok(Some(field)) = fields.next() {
        match field.type_() {
            b'V' => severity = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            _ => {}
        }
    }
    tracing::debug!(%severity, %message, "notice from server");
}
