//! The errors of this crate.

use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::ErrorFields;

/// SQLSTATEs of failed authentication: `invalid_password` and
/// `invalid_authorization_specification` (no `pg_hba.conf` entry, unknown role).
const AUTH_CODES: [&str; 2] = ["28P01", "28000"];

/// SQLSTATEs after which reconnecting later can succeed: the server is shutting down,
/// restarting or starting up, or has no free connection slot.
const RETRYABLE_CODES: [&str; 4] = ["57P01", "57P02", "57P03", "53300"];

/// Everything that can go wrong while talking to a walsender.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection string could not be parsed or lacks something we need.
    #[error("invalid connection string: {0}")]
    Config(String),

    /// TLS was required, which this client does not implement.
    #[error(
        "sslmode \"{0}\" is not supported: connections to PostgreSQL do not use TLS\n\
         HINT: connect over the Unix socket or the loopback interface with sslmode=disable"
    )]
    UnsupportedSslMode(String),

    /// Connecting, reading or writing failed (including timeouts and the server closing the
    /// connection); always worth a retry.
    #[error("could not {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The server rejected our credentials (SQLSTATE 28P01 or 28000), or asked for a method we
    /// cannot do.
    #[error("authentication failed for user \"{user}\": {message}")]
    Auth {
        user: String,
        code: Option<String>,
        message: String,
    },

    /// An `ErrorResponse` from the server.
    #[error("server error: {message} (SQLSTATE {code}){}", detail_and_hint(.detail, .hint))]
    Server {
        /// `ERROR`, `FATAL` or `PANIC` (the non-localized severity when the server sends it).
        severity: String,
        code: String,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },

    /// The server sent something the protocol does not allow here.
    #[error("protocol error: {0}")]
    Protocol(String),

    /// `CREATE_REPLICATION_SLOT` for a slot that exists (SQLSTATE 42710).
    #[error("replication slot \"{slot}\" already exists")]
    SlotExists { slot: String },
}

fn detail_and_hint(detail: &Option<String>, hint: &Option<String>) -> String {
    let mut out = String::new();
    if let Some(detail) = detail {
        out.push_str("\nDETAIL: ");
        out.push_str(detail);
    }
    if let Some(hint) = hint {
        out.push_str("\nHINT: ");
        out.push_str(hint);
    }
    out
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Error {
        Error::Protocol(message.into())
    }

    /// The SQLSTATE the server sent, for [`Error::Server`] and [`Error::Auth`].
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Server { code, .. } => Some(code),
            Error::Auth { code, .. } => code.as_deref(),
            Error::SlotExists { .. } => Some("42710"),
            _ => None,
        }
    }

    /// The requested WAL is gone from the server (`requested WAL segment ... has already been
    /// removed`, SQLSTATE 58P01): streaming from there can never succeed.
    pub fn is_wal_removed(&self) -> bool {
        matches!(self, Error::Server { code, message, .. }
            if code == "58P01" && message.contains("has already been removed"))
    }

    /// Whether trying again later can help: I/O errors (refused, reset, timed out, closed) and
    /// servers shutting down, starting up or out of connection slots (SQLSTATE 57P01, 57P02,
    /// 57P03, 53300, class 08).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Io { .. } => true,
            Error::Server { code, .. } => {
                RETRYABLE_CODES.contains(&code.as_str()) || code.starts_with("08")
            }
            _ => false,
        }
    }

    /// Converts the fields of an `ErrorResponse`; authentication failures become
    /// [`Error::Auth`] for `user`.
    pub(crate) fn from_fields(mut fields: ErrorFields<'_>, user: &str) -> Error {
        let mut severity = None;
        let mut localized_severity = None;
        let mut code = None;
        let mut message = None;
        let mut detail = None;
        let mut hint = None;
        loop {
            match fields.next() {
                Ok(Some(field)) => {
                    let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
                    match field.type_() {
                        b'V' => severity = Some(value),
                        b'S' => localized_severity = Some(value),
                        b'C' => code = Some(value),
                        b'M' => message = Some(value),
                        b'D' => detail = Some(value),
                        b'H' => hint = Some(value),
                        _ => {}
                    }
                }
                Ok(None) => break,
                Err(e) => return Error::protocol(format!("malformed ErrorResponse: {e}")),
            }
        }
        let code = code.unwrap_or_else(|| "XX000".to_string());
        let message = message.unwrap_or_else(|| "(no message)".to_string());
        if AUTH_CODES.contains(&code.as_str()) {
            return Error::Auth {
                user: user.to_string(),
                code: Some(code),
                message,
            };
        }
        Error::Server {
            severity: severity
                .or(localized_severity)
                .unwrap_or_else(|| "ERROR".to_string()),
            code,
            message,
            detail,
            hint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, message: &str) -> Error {
        Error::Server {
            severity: "ERROR".into(),
            code: code.into(),
            message: message.into(),
            detail: None,
            hint: Some("do something".into()),
        }
    }

    #[test]
    fn server_error_displays_message_code_and_hint() {
        let e = server(
            "58P01",
            "requested WAL segment 000000010000000000000001 has already been removed",
        );
        assert_eq!(
            e.to_string(),
            "server error: requested WAL segment 000000010000000000000001 has already been removed \
             (SQLSTATE 58P01)\nHINT: do something"
        );
        assert!(e.is_wal_removed());
        assert!(!e.is_retryable());
    }

    #[test]
    fn error_classification_retryable_codes() {
        assert!(
            server(
                "57P01",
                "terminating connection due to administrator command"
            )
            .is_retryable()
        );
        assert!(server("57P03", "the database system is starting up").is_retryable());
        assert!(!server("42704", "x").is_retryable());
        assert!(!server("58P01", "could not open file").is_wal_removed());
        let io = Error::io(
            "connect",
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        );
        assert!(io.is_retryable());
        assert_eq!(Error::SlotExists { slot: "s".into() }.code(), Some("42710"));
    }
}
