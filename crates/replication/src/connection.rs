//! A replication connection: startup, authentication and replication commands.

use bytes::Bytes;
use fallible_iterator::FallibleIterator;
use klio_pg::{Lsn, SegmentSize, TimeLineId};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::backend::{DataRowBody, Message, RowDescriptionBody};
use postgres_protocol::message::frontend;

use crate::config::ReplicationConfig;
use crate::error::Error;
use crate::stream::ReplicationStream;
use crate::wire::{Backend, Wire};

/// SQLSTATE `duplicate_object`.
const DUPLICATE_OBJECT: &str = "42710";

/// What `IDENTIFY_SYSTEM` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's system identifier (as in `pg_control_system()`).
    pub system_id: u64,
    /// The server's current timeline.
    pub timeline: TimeLineId,
    /// The current WAL flush location.
    pub xlogpos: Lsn,
}

/// What `READ_REPLICATION_SLOT` reports for an existing physical slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    /// `None` until the slot reserves WAL.
    pub restart_lsn: Option<Lsn>,
    /// The timeline of `restart_lsn` in the server's history.
    pub restart_tli: Option<TimeLineId>,
}

/// A connected, authenticated replication connection (`replication=true`), outside of
/// streaming.
pub struct ReplicationConnection {
    pub(crate) wire: Wire,
}

impl std::fmt::Debug for ReplicationConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationConnection")
            .field("user", &self.wire.user())
            .finish_non_exhaustive()
    }
}

/// The result of a simple query: column names and rows of optional values.
pub(crate) struct QueryResult {
    pub(crate) columns: Vec<String>,
    pub(crate) rows: Vec<Vec<Option<Bytes>>>,
}

impl QueryResult {
    /// Column `index` of the only row, as text; `what` names the command for errors.
    pub(crate) fn single_text(&self, index: usize, what: &str) -> Result<Option<&str>, Error> {
        let [row] = self.rows.as_slice() else {
            return Err(Error::protocol(format!(
                "{what} returned {} rows instead of 1",
                self.rows.len()
            )));
        };
        let value = row.get(index).ok_or_else(|| {
            Error::protocol(format!(
                "{what} returned {} columns, expected more than {index}",
                row.len()
            ))
        })?;
        value
            .as_ref()
            .map(|v| std::str::from_utf8(v))
            .transpose()
            .map_err(|_| Error::protocol(format!("{what} returned a value that is not UTF-8")))
    }

    pub(crate) fn required_text(&self, index: usize, what: &str) -> Result<&str, Error> {
        self.single_text(index, what)?
            .ok_or_else(|| Error::protocol(format!("{what} returned NULL in column {index}")))
    }
}

pub(crate) fn row_description(body: &RowDescriptionBody) -> Result<Vec<String>, Error> {
    body.fields()
        .map(|f| Ok(f.name().to_string()))
        .collect()
        .map_err(|e| Error::protocol(format!("invalid RowDescription: {e}")))
}

pub(crate) fn data_row(body: &DataRowBody) -> Result<Vec<Option<Bytes>>, Error> {
    let buffer = body.buffer_bytes();
    body.ranges()
        .map(|range| Ok(range.map(|r| buffer.slice(r))))
        .collect()
        .map_err(|e| Error::protocol(format!("invalid DataRow: {e}")))
}

pub(crate) fn parse_lsn(text: &str, what: &str) -> Result<Lsn, Error> {
    text.parse()
        .map_err(|_| Error::protocol(format!("{what}: invalid LSN \"{text}\"")))
}

pub(crate) fn parse_tli(text: &str, what: &str) -> Result<TimeLineId, Error> {
    match text.parse::<u32>() {
        Ok(tli) if tli > 0 => Ok(TimeLineId(tli)),
        _ => Err(Error::protocol(format!(
            "{what}: invalid timeline \"{text}\""
        ))),
    }
}

/// Quotes an identifier for a replication command.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Parses a size setting as `SHOW` displays it (`16MB`, `1GB`, `8192`, `512kB`) into bytes.
pub fn parse_size_setting(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let number: u64 = text[..digits].parse().ok()?;
    let unit: u64 = match text[digits..].trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(unit)
}

impl ReplicationConnection {
    /// Connects and authenticates (trust, cleartext password, MD5 or SCRAM-SHA-256 without
    /// channel binding) within `cfg.connect_timeout`. The startup packet asks for a physical
    /// replication connection (`replication=true`, no database).
    pub async fn connect(cfg: &ReplicationConfig) -> Result<ReplicationConnection, Error> {
        match tokio::time::timeout(cfg.connect_timeout, Self::connect_inner(cfg)).await {
            Ok(result) => result,
            Err(_) => Err(Error::io(
                format!("connect to server \"{}\"", cfg.target()),
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("timeout expired after {:?}", cfg.connect_timeout),
                ),
            )),
        }
    }

    async fn connect_inner(cfg: &ReplicationConfig) -> Result<ReplicationConnection, Error> {
        let mut wire = Wire::connect(cfg).await?;
        let params = [
            ("user", cfg.user.as_str()),
            ("replication", "true"),
            ("application_name", cfg.application_name.as_str()),
        ];
        frontend::startup_message(params, &mut wire.write_buf)
            .map_err(|e| Error::Config(format!("invalid startup parameter: {e}")))?;
        wire.flush().await?;
        let mut conn = ReplicationConnection { wire };
        conn.authenticate(cfg).await?;
        loop {
            match conn.wire.read().await? {
                Backend::Message(Message::BackendKeyData(_)) => {}
                Backend::Message(Message::ReadyForQuery(_)) => return Ok(conn),
                Backend::Message(Message::ErrorResponse(body)) => {
                    return Err(conn.wire.error(&body));
                }
                other => return Err(unexpected(&other, "after authentication")),
            }
        }
    }

    fn auth_error(&self, message: impl Into<String>) -> Error {
        Error::Auth {
            user: self.wire.user().to_string(),
            code: None,
            message: message.into(),
        }
    }

    async fn authenticate(&mut self, cfg: &ReplicationConfig) -> Result<(), Error> {
        let user = self.wire.user().to_string();
        let password = || {
            cfg.password.as_deref().ok_or_else(|| Error::Auth {
                user: user.clone(),
                code: None,
                message:
                    "the server requested password authentication, but no password was provided"
                        .into(),
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let message = match self.wire.read().await? {
                Backend::Message(message) => message,
                other => return Err(unexpected(&other, "during authentication")),
            };
            match message {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), &mut self.wire.write_buf)
                        .map_err(|e| self.auth_error(format!("cannot encode password: {e}")))?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = md5_hash(cfg.user.as_bytes(), password()?.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.wire.write_buf)
                        .map_err(|e| self.auth_error(format!("cannot encode password: {e}")))?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut offered = Vec::new();
                    while let Some(m) = mechanisms
                        .next()
                        .map_err(|e| Error::protocol(format!("invalid SASL mechanism list: {e}")))?
                    {
                        offered.push(m.to_string());
                    }
                    if !offered.iter().any(|m| m == SCRAM_SHA_256) {
                        return Err(self.auth_error(format!(
                            "none of the server's SASL mechanisms ({}) is supported",
                            offered.join(", ")
                        )));
                    }
                    let client =
                        ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        SCRAM_SHA_256,
                        client.message(),
                        &mut self.wire.write_buf,
                    )
                    .map_err(|e| self.auth_error(format!("cannot encode SASL message: {e}")))?;
                    scram = Some(client);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let client = scram.as_mut().ok_or_else(|| {
                        Error::protocol("SASL continuation without a SASL exchange")
                    })?;
                    client.update(body.data()).map_err(|e| {
                        self.auth_error(format!("invalid SCRAM server message: {e}"))
                    })?;
                    frontend::sasl_response(client.message(), &mut self.wire.write_buf)
                        .map_err(|e| self.auth_error(format!("cannot encode SASL message: {e}")))?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let client = scram.as_mut().ok_or_else(|| {
                        Error::protocol("SASL final message without a SASL exchange")
                    })?;
                    client.finish(body.data()).map_err(|e| {
                        self.auth_error(format!("invalid SCRAM server signature: {e}"))
                    })?;
                    continue;
                }
                Message::ErrorResponse(body) => return Err(self.wire.error(&body)),
                Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationGss
                | Message::AuthenticationGssContinue(_)
                | Message::AuthenticationSspi => {
                    return Err(self
                        .auth_error("the server requested an unsupported authentication method"));
                }
                other => {
                    return Err(unexpected(
                        &Backend::Message(other),
                        "during authentication",
                    ));
                }
            }
            self.wire.flush().await?;
        }
    }

    /// Runs a replication command with the simple query protocol and collects its rows.
    pub(crate) async fn simple_query(&mut self, command: &str) -> Result<QueryResult, Error> {
        match self.run_command(command, false).await? {
            CommandOutcome::Rows(result) => Ok(result),
            CommandOutcome::CopyBoth => Err(Error::protocol(format!(
                "unexpected CopyBothResponse in response to \"{command}\""
            ))),
        }
    }

    /// Sends `command` and reads until ReadyForQuery, collecting rows; when `copy_both` is
    /// set, a CopyBothResponse (streaming starts) ends the exchange early.
    async fn run_command(
        &mut self,
        command: &str,
        copy_both: bool,
    ) -> Result<CommandOutcome, Error> {
        tracing::trace!(command, "replication command");
        frontend::query(command, &mut self.wire.write_buf)
            .map_err(|e| Error::protocol(format!("cannot encode command: {e}")))?;
        self.wire.flush().await?;
        let mut result = QueryResult {
            columns: Vec::new(),
            rows: Vec::new(),
        };
        let mut error = None;
        loop {
            match self.wire.read().await? {
                Backend::CopyBothResponse if copy_both && error.is_none() => {
                    return Ok(CommandOutcome::CopyBoth);
                }
                Backend::Message(Message::RowDescription(body)) => {
                    result.columns = row_description(&body)?
                }
                Backend::Message(Message::DataRow(body)) => result.rows.push(data_row(&body)?),
                Backend::Message(Message::CommandComplete(_) | Message::EmptyQueryResponse) => {}
                Backend::Message(Message::ErrorResponse(body)) => {
                    error = Some(self.wire.error(&body))
                }
                Backend::Message(Message::ReadyForQuery(_)) => break,
                other => return Err(unexpected(&other, &format!("in response to \"{command}\""))),
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(CommandOutcome::Rows(result)),
        }
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, Error> {
        const WHAT: &str = "IDENTIFY_SYSTEM";
        let result = self.simple_query(WHAT).await?;
        let system_id = result.required_text(0, WHAT)?;
        let system_id = system_id.parse().map_err(|_| {
            Error::protocol(format!("{WHAT}: invalid system identifier \"{system_id}\""))
        })?;
        Ok(SystemIdentity {
            system_id,
            timeline: parse_tli(result.required_text(1, WHAT)?, WHAT)?,
            xlogpos: parse_lsn(result.required_text(2, WHAT)?, WHAT)?,
        })
    }

    /// `SHOW name`: the value of a setting as the server displays it (`SHOW wal_segment_size`
    /// gives `16MB`). `name` may contain letters, digits, `_` and `.`.
    pub async fn show(&mut self, name: &str) -> Result<String, Error> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            return Err(Error::protocol(format!("invalid setting name \"{name}\"")));
        }
        let what = format!("SHOW {name}");
        let result = self.simple_query(&what).await?;
        Ok(result.required_text(0, &what)?.to_string())
    }

    /// The server's `wal_segment_size`.
    pub async fn wal_segment_size(&mut self) -> Result<SegmentSize, Error> {
        let text = self.show("wal_segment_size").await?;
        let bytes = parse_size_setting(&text)
            .ok_or_else(|| Error::protocol(format!("invalid wal_segment_size \"{text}\"")))?;
        SegmentSize::new(bytes)
            .map_err(|e| Error::protocol(format!("invalid wal_segment_size \"{text}\": {e}")))
    }

    /// `READ_REPLICATION_SLOT`: `None` when there is no slot of that name (PostgreSQL 15+;
    /// a logical slot is an [`Error::Server`]).
    pub async fn read_replication_slot(&mut self, slot: &str) -> Result<Option<SlotInfo>, Error> {
        let what = format!("READ_REPLICATION_SLOT {}", quote_ident(slot));
        let result = self.simple_query(&what).await?;
        if result.single_text(0, &what)?.is_none() {
            return Ok(None);
        }
        let restart_lsn = result
            .single_text(1, &what)?
            .map(|t| parse_lsn(t, &what))
            .transpose()?;
        let restart_tli = result
            .single_text(2, &what)?
            .map(|t| parse_tli(t, &what))
            .transpose()?;
        Ok(Some(SlotInfo {
            restart_lsn,
            restart_tli,
        }))
    }

    /// `CREATE_REPLICATION_SLOT "slot" PHYSICAL RESERVE_WAL`: the slot holds WAL from now on.
    /// [`Error::SlotExists`] when it exists.
    pub async fn create_physical_slot(&mut self, slot: &str) -> Result<(), Error> {
        let command = format!(
            "CREATE_REPLICATION_SLOT {} PHYSICAL RESERVE_WAL",
            quote_ident(slot)
        );
        match self.simple_query(&command).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(DUPLICATE_OBJECT) => Err(Error::SlotExists {
                slot: slot.to_string(),
            }),
            Err(e) => Err(e),
        }
    }

    /// `TIMELINE_HISTORY tli`: the history file's name (`00000002.history`) and content.
    pub async fn timeline_history(&mut self, tli: TimeLineId) -> Result<(String, Vec<u8>), Error> {
        let what = format!("TIMELINE_HISTORY {}", tli.0);
        let result = self.simple_query(&what).await?;
        let name = result.required_text(0, &what)?.to_string();
        // The walsender sends the file's bytes as they are, whatever the column type says.
        let content = match result.rows.first().and_then(|row| row.get(1)) {
            Some(Some(bytes)) => bytes.to_vec(),
            _ => return Err(Error::protocol(format!("{what} returned no content"))),
        };
        Ok((name, content))
    }

    /// `START_REPLICATION [SLOT "slot"] PHYSICAL start TIMELINE timeline`. `start` should be
    /// the start of a segment or a position the receiver already has up to.
    ///
    /// When `timeline` is a historic timeline that ends exactly at `start`, the server skips
    /// streaming: the returned stream then ends at once ([`crate::StreamMessage::EndOfStream`])
    /// and [`ReplicationStream::finish_timeline`] reports the next timeline.
    pub async fn start_physical(
        mut self,
        slot: Option<&str>,
        start: Lsn,
        timeline: TimeLineId,
    ) -> Result<ReplicationStream, Error> {
        let slot_clause = slot
            .map(|s| format!("SLOT {} ", quote_ident(s)))
            .unwrap_or_default();
        let command = format!(
            "START_REPLICATION {slot_clause}PHYSICAL {start} TIMELINE {}",
            timeline.0
        );
        tracing::debug!(command, "start streaming");
        match self.run_command(&command, true).await? {
            CommandOutcome::CopyBoth => Ok(ReplicationStream::streaming(self)),
            CommandOutcome::Rows(result) => {
                let next = next_timeline(&result)?;
                Ok(ReplicationStream::skipped(self, next))
            }
        }
    }
}

/// How a command ended: with rows (and ReadyForQuery), or by starting to stream.
enum CommandOutcome {
    Rows(QueryResult),
    CopyBoth,
}

/// The `(next_tli, next_tli_startpos)` result set sent at the end of a historic timeline.
pub(crate) fn next_timeline(result: &QueryResult) -> Result<Option<(TimeLineId, Lsn)>, Error> {
    const WHAT: &str = "end of timeline result";
    if result.rows.is_empty() {
        return Ok(None);
    }
    if result.columns.len() < 2 {
        return Err(Error::protocol(format!(
            "{WHAT}: expected 2 columns, got {:?}",
            result.columns
        )));
    }
    let tli = parse_tli(result.required_text(0, WHAT)?, WHAT)?;
    let lsn = parse_lsn(result.required_text(1, WHAT)?, WHAT)?;
    Ok(Some((tli, lsn)))
}

pub(crate) fn unexpected(message: &Backend, when: &str) -> Error {
    Error::protocol(format!("unexpected {} message {when}", message.describe()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_setting_units() {
        assert_eq!(parse_size_setting("16MB"), Some(16 << 20));
        assert_eq!(parse_size_setting("1GB"), Some(1 << 30));
        assert_eq!(parse_size_setting("512kB"), Some(512 << 10));
        assert_eq!(parse_size_setting("8192"), Some(8192));
        assert_eq!(parse_size_setting("16 MB"), Some(16 << 20));
        assert_eq!(parse_size_setting("MB"), None);
        assert_eq!(parse_size_setting("16XB"), None);
        assert_eq!(parse_size_setting("99999999999999TB"), None);
    }

    #[test]
    fn quote_ident_doubles_quotes() {
        assert_eq!(quote_ident("slot"), "\"slot\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
