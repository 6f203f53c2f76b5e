//! Where and how to connect: parsed from a libpq connection string.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::error::Error;

/// How long connecting (including authentication) may take unless the DSN sets
/// `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The server to connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address.
    Tcp(String),
    /// A directory holding the server's socket `.s.PGSQL.<port>`.
    Unix(PathBuf),
}

/// Connection parameters of a replication connection.
#[derive(Clone, PartialEq, Eq)]
pub struct ReplicationConfig {
    pub host: Host,
    pub port: u16,
    pub user: String,
    /// Redacted in `Debug`.
    pub password: Option<String>,
    pub application_name: String,
    pub connect_timeout: Duration,
}

impl fmt::Debug for ReplicationConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("application_name", &self.application_name)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl ReplicationConfig {
    /// Parses a libpq connection string, `key=value` or `postgres://` URL form.
    ///
    /// Used: `host` (or `hostaddr`; a value starting with `/` is a socket directory), `port`
    /// (default 5432), `user` (required), `password`, `application_name` (defaults to the
    /// `application_name` argument), `connect_timeout` (default 30 s), `sslmode`. Other libpq
    /// parameters (such as `dbname`) are accepted and ignored. Exactly one host is required:
    /// there is no libpq-style default host or host list.
    ///
    /// TLS is not implemented: `sslmode` `disable`, `allow` and `prefer` connect without it,
    /// `require`, `verify-ca` and `verify-full` fail with [`Error::UnsupportedSslMode`].
    pub fn from_dsn(dsn: &str, application_name: &str) -> Result<ReplicationConfig, Error> {
        let (dsn, sslmode) = take_sslmode(dsn);
        match sslmode.as_deref() {
            None | Some("disable" | "allow" | "prefer") => {}
            Some(mode @ ("require" | "verify-ca" | "verify-full")) => {
                return Err(Error::UnsupportedSslMode(mode.to_string()));
            }
            Some(other) => return Err(Error::Config(format!("invalid sslmode value \"{other}\""))),
        }
        let parsed =
            tokio_postgres::Config::from_str(&dsn).map_err(|e| Error::Config(e.to_string()))?;

        let hosts = parsed.get_hosts();
        let hostaddrs = parsed.get_hostaddrs();
        if hosts.len() > 1 || hostaddrs.len() > 1 {
            return Err(Error::Config("more than one host is not supported".into()));
        }
        let host = match (hostaddrs.first(), hosts.first()) {
            (Some(addr), _) => Host::Tcp(addr.to_string()),
            (None, Some(tokio_postgres::config::Host::Tcp(name))) => Host::Tcp(name.clone()),
            (None, Some(tokio_postgres::config::Host::Unix(dir))) => Host::Unix(dir.clone()),
            (None, None) => return Err(Error::Config("missing \"host\"".into())),
        };
        let port = match parsed.get_ports() {
            [] => 5432,
            [port] => *port,
            _ => return Err(Error::Config("more than one port is not supported".into())),
        };
        let user = parsed
            .get_user()
            .ok_or_else(|| Error::Config("missing \"user\"".into()))?
            .to_string();
        let password = match parsed.get_password() {
            None => None,
            Some(bytes) => Some(
                String::from_utf8(bytes.to_vec())
                    .map_err(|_| Error::Config("\"password\" is not valid UTF-8".into()))?,
            ),
        };
        let application_name = parsed
            .get_application_name()
            .unwrap_or(application_name)
            .to_string();
        let connect_timeout = parsed
            .get_connect_timeout()
            .copied()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        Ok(ReplicationConfig {
            host,
            port,
            user,
            password,
            application_name,
            connect_timeout,
        })
    }

    /// The socket file for [`Host::Unix`].
    pub fn socket_path(&self) -> Option<PathBuf> {
        match &self.host {
            Host::Unix(dir) => Some(dir.join(format!(".s.PGSQL.{}", self.port))),
            Host::Tcp(_) => None,
        }
    }

    /// `host:port` or the socket path, for messages.
    pub fn target(&self) -> String {
        match &self.host {
            Host::Tcp(host) if host.contains(':') => format!("[{host}]:{}", self.port),
            Host::Tcp(host) => format!("{host}:{}", self.port),
            Host::Unix(dir) => dir
                .join(format!(".s.PGSQL.{}", self.port))
                .display()
                .to_string(),
        }
    }
}

/// Removes `sslmode` from a connection string (tokio_postgres rejects `allow`, `verify-ca` and
/// `verify-full`, and we want our own message for the modes we cannot do); returns the rest and
/// the last `sslmode` value. Malformed strings are returned unchanged for tokio_postgres to
/// report.
fn take_sslmode(dsn: &str) -> (String, Option<String>) {
    let trimmed = dsn.trim_start();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        return take_sslmode_url(dsn);
    }
    take_sslmode_key_value(dsn).unwrap_or_else(|| (dsn.to_string(), None))
}

fn take_sslmode_url(dsn: &str) -> (String, Option<String>) {
    let Some((base, query)) = dsn.split_once('?') else {
        return (dsn.to_string(), None);
    };
    let mut mode = None;
    let mut kept = Vec::new();
    for param in query.split('&') {
        match param.split_once('=') {
            Some(("sslmode", value)) => mode = Some(value.to_string()),
            _ => kept.push(param),
        }
    }
    if kept.is_empty() {
        (base.to_string(), mode)
    } else {
        (format!("{base}?{}", kept.join("&")), mode)
    }
}

/// Walks `key = value` pairs like libpq (values may be single-quoted, with backslash escapes).
fn take_sslmode_key_value(dsn: &str) -> Option<(String, Option<String>)> {
    let bytes = dsn.as_bytes();
    let mut i = 0;
    let mut out = String::new();
    let mut mode = None;
    let skip_ws = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        let start = i;
        i = skip_ws(i);
        if i == bytes.len() {
            out.push_str(&dsn[start..]);
            return Some((out, mode));
        }
        let key_start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &dsn[key_start..i];
        i = skip_ws(i);
        if i == bytes.len() || bytes[i] != b'=' {
            return None;
        }
        i = skip_ws(i + 1);
        let mut value = String::new();
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => return None,
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(c) => {
                        if *c == b'\\' && i + 1 < bytes.len() {
                            i += 1;
                        }
                        let ch = dsn[i..].chars().next()?;
                        value.push(ch);
                        i += ch.len_utf8();
                    }
                }
            }
        } else {
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                let ch = dsn[i..].chars().next()?;
                value.push(ch);
                i += ch.len_utf8();
            }
        }
        if key == "sslmode" {
            mode = Some(value);
        } else {
            out.push_str(&dsn[start..i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(dsn: &str) -> ReplicationConfig {
        match ReplicationConfig::from_dsn(dsn, "klio") {
            Ok(cfg) => cfg,
            Err(e) => panic!("{dsn}: {e}"),
        }
    }

    #[test]
    fn from_dsn_key_value_tcp_with_password() {
        let cfg =
            parse("host=127.0.0.1 port=5433 user=postgres dbname=postgres password='a b\\'c'");
        assert_eq!(cfg.host, Host::Tcp("127.0.0.1".into()));
        assert_eq!(cfg.port, 5433);
        assert_eq!(cfg.user, "postgres");
        assert_eq!(cfg.password.as_deref(), Some("a b'c"));
        assert_eq!(cfg.application_name, "klio");
        assert_eq!(cfg.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(cfg.target(), "127.0.0.1:5433");
        let debug = format!("{cfg:?}");
        assert!(
            debug.contains("<redacted>") && !debug.contains("a b'c"),
            "{debug}"
        );
    }

    #[test]
    fn from_dsn_unix_socket_directory_and_defaults() {
        let cfg = parse("host=/tmp/sock user=app application_name=mine connect_timeout=5");
        assert_eq!(cfg.host, Host::Unix("/tmp/sock".into()));
        assert_eq!(cfg.port, 5432);
        assert_eq!(
            cfg.socket_path(),
            Some(PathBuf::from("/tmp/sock/.s.PGSQL.5432"))
        );
        assert_eq!(cfg.application_name, "mine");
        assert_eq!(cfg.connect_timeout, Duration::from_secs(5));
        assert_eq!(cfg.password, None);
    }

    #[test]
    fn from_dsn_url_form_with_sslmode() {
        let cfg =
            parse("postgresql://rep:pw@db.example:6543/postgres?sslmode=prefer&application_name=x");
        assert_eq!(cfg.host, Host::Tcp("db.example".into()));
        assert_eq!(cfg.port, 6543);
        assert_eq!(cfg.user, "rep");
        assert_eq!(cfg.password.as_deref(), Some("pw"));
        assert_eq!(cfg.application_name, "x");
        let cfg = parse("postgres://rep@%2Fvar%2Frun%2Fpostgresql:5432?sslmode=allow");
        assert_eq!(cfg.host, Host::Unix("/var/run/postgresql".into()));
    }

    #[test]
    fn from_dsn_sslmode_requiring_tls_is_rejected() {
        for dsn in [
            "host=h user=u sslmode=require",
            "host=h user=u sslmode = 'verify-full'",
            "postgres://u@h/db?sslmode=verify-ca",
        ] {
            match ReplicationConfig::from_dsn(dsn, "klio") {
                Err(Error::UnsupportedSslMode(_)) => {}
                other => panic!("{dsn}: {other:?}"),
            }
        }
        assert_eq!(parse("host=h user=u sslmode=allow port=1").port, 1);
        assert_eq!(
            parse("sslmode=disable host=h user=u").host,
            Host::Tcp("h".into())
        );
        assert!(matches!(
            ReplicationConfig::from_dsn("host=h user=u sslmode=bogus", "k"),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn from_dsn_missing_user_or_host_or_garbage_fails() {
        for dsn in [
            "host=h",
            "user=u",
            "host=a,b user=u",
            "host=h user=u port=x",
            "host='unterminated",
        ] {
            assert!(
                matches!(ReplicationConfig::from_dsn(dsn, "k"), Err(Error::Config(_))),
                "{dsn}"
            );
        }
    }
}
