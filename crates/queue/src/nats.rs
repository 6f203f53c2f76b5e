//! The NATS JetStream backend (`--queue-nats-url`), for nats-server 2.9 and later.
//!
//! Layout on the server:
//!
//! - Stream [`STREAM`] (`KLIO_TASKS`): subjects `klio.tasks.>`, work-queue retention (a message
//!   leaves the stream when it is acked), file storage, at most one message per subject, and
//!   "discard new per subject": a publish to a subject that still holds a message is refused.
//! - A task is published as JSON to `klio.tasks.<kind>.<cluster>.<id>` (each part escaped into
//!   one subject token, see [`subject_token`]). Because the subject carries the id, the server
//!   itself refuses a second pending task with the same id, for as long as the first is pending
//!   and no longer. (A `Nats-Msg-Id` header would instead suppress the id for the stream's
//!   whole duplicate window, also after the task was acked, so a retried or re-enqueued task
//!   would be dropped.)
//! - One durable pull consumer [`CONSUMER`] (`klio-workers`), explicit ack, `ack_wait` = the
//!   lease given to `fetch`, unlimited `max_deliver`: the attempt limit is enforced here, so a
//!   task never stays stuck in the stream after its last delivery. Every delivery is an attempt
//!   (`delivered` in the message's metadata). Shared by every Klio server on the same NATS.
//! - The dead-letter list: stream [`FAILED_STREAM`] (`KLIO_FAILED`), subjects `klio.failed.>`,
//!   file storage, one message per subject: a JSON [`FailedTask`] at `klio.failed.<id>`. Listing
//!   reads it with a short-lived pull consumer; a retry republishes the task and purges its
//!   subject. (A key-value bucket would be the natural fit, but async-nats 0.51 cannot create
//!   one on a 2.9 server: it fails to parse 2.9's account info.)
//!
//! A nak before the last attempt is `-NAK` with a delay; keep-alive is `+WPI`. A nak on the last
//! attempt, or a delivery beyond the limit (the last lease expired), first writes the dead-letter
//! entry and then acks the message: a crash in between leaves the task in both places and the
//! next delivery repeats the move, so nothing is lost. Acks, naks and keep-alives wait for the
//! server's confirmation.
//!
//! `fetch` polls with no-wait pull requests (every 100 ms, for up to [`FETCH_WAIT`]) rather than
//! one waiting request: on nats-server before 2.10, a waiting request that expires just as a
//! redelivery falls due makes the server lose track of the delivery (the count jumps or goes
//! back, and the message waits for the next request; nats-server #5305 and #5338), which the
//! tests here hit about one run in three.

use std::fmt;
use std::time::Duration;

use std::path::{Path, PathBuf};

use async_nats::jetstream::{self, AckKind, consumer, stream};
use futures::StreamExt;
use tokio::sync::Mutex;

use crate::error::{Error, Result};
use crate::task::{Delivery, FailedTask, Task, Token};
use crate::{BoxFuture, DEFAULT_LEASE, FETCH_WAIT, RetryPolicy, WorkQueue};

/// The work stream.
pub const STREAM: &str = "KLIO_TASKS";
/// The subject prefix of tasks; the stream holds `klio.tasks.>`.
pub const SUBJECT_PREFIX: &str = "klio.tasks";
/// The durable pull consumer every worker shares.
pub const CONSUMER: &str = "klio-workers";
/// The stream holding the dead-letter list.
pub const FAILED_STREAM: &str = "KLIO_FAILED";
/// The subject prefix of the dead-letter list; the stream holds `klio.failed.>`.
pub const FAILED_PREFIX: &str = "klio.failed";

/// How often an idle `fetch` asks the server for work.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The NATS backend's handle on one delivery.
pub(crate) struct Lease {
    acker: jetstream::message::Acker,
    stream_sequence: u64,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("stream_sequence", &self.stream_sequence)
            .finish_non_exhaustive()
    }
}

/// Escapes `s` into one NATS subject token: ASCII letters, digits,
/// `-` and `_` stay, every other byte becomes `=XX` (upper-case hex). Reversible, and never
/// empty for a non-empty input.
pub fn subject_token(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

/// The subject a task is published to.
pub fn task_subject(task: &Task) -> String {
    format!(
        "{SUBJECT_PREFIX}.{}.{}.{}",
        subject_token(&task.kind),
        subject_token(&task.cluster),
        subject_token(&task.id)
    )
}

/// The dead-letter subject of task `id`.
pub fn failed_subject(id: &str) -> String {
    format!("{FAILED_PREFIX}.{}", subject_token(id))
}

/// The work queue on NATS JetStream. See the [module docs](self) for the layout.
pub struct NatsQueue {
    url: String,
    js: jetstream::Context,
    stream: stream::Stream,
    /// The consumer and its current `ack_wait`.
    consumer: Mutex<(consumer::PullConsumer, Duration)>,
    failed: stream::Stream,
    max_attempts: u32,
}

impl NatsQueue {
    /// Connects to `url` without credentials or TLS settings beyond what the URL says; see
    /// [`NatsQueue::connect_with`].
    pub async fn connect(url: &str, policy: &RetryPolicy) -> Result<NatsQueue> {
        NatsQueue::connect_with(&NatsOptions::new(url), policy).await
    }

    /// Connects as `options` says and creates the streams and the consumer when they do not
    /// exist. Tasks get `policy.max_attempts` deliveries before they move to the dead-letter
    /// list.
    pub async fn connect_with(options: &NatsOptions, policy: &RetryPolicy) -> Result<NatsQueue> {
        let shown = redact_url(&options.url);
        let url = shown.as_str();
        let err = |action: &str, e: &dyn fmt::Display| Error::Nats {
            url: url.to_string(),
            action: action.to_string(),
            message: e.to_string(),
        };
        let client = options
            .connect_options()
            .await?
            .name("klio")
            .connection_timeout(Duration::from_secs(5))
            .connect(split_userinfo(&options.url).0.as_str())
            .await
            .map_err(|e| err("connect", &e))?;
        let js = jetstream::new(client);

        let wanted = stream::Config {
            name: STREAM.to_string(),
            description: Some("Klio work queue".to_string()),
            subjects: vec![format!("{SUBJECT_PREFIX}.>")],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            max_messages_per_subject: 1,
            discard: stream::DiscardPolicy::New,
            discard_new_per_subject: true,
            ..Default::default()
        };
        let mut work = js
            .get_or_create_stream(wanted.clone())
            .await
            .map_err(|e| err(&format!("create stream \"{STREAM}\""), &e))?;
        let have = &work.cached_info().config;
        if have.max_messages_per_subject != 1
            || have.discard != stream::DiscardPolicy::New
            || !have.discard_new_per_subject
            || have.subjects != wanted.subjects
        {
            js.update_stream(wanted)
                .await
                .map_err(|e| err(&format!("update stream \"{STREAM}\""), &e))?;
            work = js
                .get_stream(STREAM)
                .await
                .map_err(|e| err(&format!("look up stream \"{STREAM}\""), &e))?;
        }
        if work.cached_info().config.retention != stream::RetentionPolicy::WorkQueue {
            return Err(err(
                &format!("use stream \"{STREAM}\""),
                &"it exists without work-queue retention\nHINT: delete the stream, or give Klio its own NATS account",
            ));
        }

        let consumer: consumer::PullConsumer = work
            .get_or_create_consumer(CONSUMER, consumer_config(DEFAULT_LEASE))
            .await
            .map_err(|e| err(&format!("create consumer \"{CONSUMER}\""), &e))?;
        let have = &consumer.cached_info().config;
        let ack_wait = have.ack_wait;
        let wanted = consumer_config(ack_wait);
        let consumer = if have.max_deliver != wanted.max_deliver
            || have.filter_subject != wanted.filter_subject
            || have.ack_policy != wanted.ack_policy
        {
            work.create_consumer(wanted)
                .await
                .map_err(|e| err(&format!("update consumer \"{CONSUMER}\""), &e))?
        } else {
            consumer
        };

        let failed = js
            .get_or_create_stream(stream::Config {
                name: FAILED_STREAM.to_string(),
                description: Some("Klio work queue: tasks that failed for good".to_string()),
                subjects: vec![format!("{FAILED_PREFIX}.>")],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_messages_per_subject: 1,
                ..Default::default()
            })
            .await
            .map_err(|e| err(&format!("create stream \"{FAILED_STREAM}\""), &e))?;

        Ok(NatsQueue {
            url: url.to_string(),
            js,
            stream: work,
            consumer: Mutex::new((consumer, ack_wait)),
            failed,
            max_attempts: policy.attempt_limit(),
        })
    }

    fn error(&self, action: impl Into<String>, e: impl fmt::Display) -> Error {
        Error::Nats {
            url: self.url.clone(),
            action: action.into(),
            message: e.to_string(),
        }
    }

    fn lease_of<'d>(&self, delivery: &'d Delivery) -> Result<&'d Lease> {
        match &delivery.token {
            Token::Nats(lease) => Ok(lease),
            Token::Embedded(_) => Err(Error::ForeignDelivery {
                id: delivery.task.id.clone(),
            }),
        }
    }

    /// Publishes `task`; `false` when a task with its id is pending.
    async fn publish(&self, task: &Task) -> Result<bool> {
        let subject = task_subject(task);
        let payload = serde_json::to_vec(task).map_err(|source| Error::Corrupt {
            id: task.id.clone(),
            source,
        })?;
        let action = || format!("enqueue task \"{}\"", task.id);
        let ack = self
            .js
            .publish(subject.clone(), payload.into())
            .await
            .map_err(|e| self.error(action(), e))?;
        match ack.await {
            Ok(_) => Ok(true),
            Err(e) => {
                // "maximum messages per subject exceeded": the id is pending. Confirm it rather
                // than parse the error text.
                match self.stream.get_last_raw_message_by_subject(&subject).await {
                    Ok(_) => Ok(false),
                    Err(_) => Err(self.error(action(), e)),
                }
            }
        }
    }

    /// Makes the consumer's `ack_wait` equal to `lease` (all workers should use one lease).
    async fn consumer_for(&self, lease: Duration) -> Result<consumer::PullConsumer> {
        let mut guard = self.consumer.lock().await;
        if guard.1 != lease {
            let updated: consumer::PullConsumer = self
                .stream
                .create_consumer(consumer_config(lease))
                .await
                .map_err(|e| self.error(format!("set the lease of consumer \"{CONSUMER}\""), e))?;
            *guard = (updated, lease);
        }
        Ok(guard.0.clone())
    }

    async fn fetch_impl(&self, max: usize, lease: Duration) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let consumer = self.consumer_for(lease).await?;
        // No-wait requests only, polled: see the module docs.
        let deadline = tokio::time::Instant::now() + FETCH_WAIT;
        let messages = loop {
            let messages = self.pull(consumer.fetch().max_messages(max)).await?;
            let now = tokio::time::Instant::now();
            if !messages.is_empty() || now >= deadline {
                break messages;
            }
            tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
        };
        let mut deliveries = Vec::with_capacity(messages.len());
        let mut first_error = None;
        for message in messages {
            match self.to_delivery(message).await {
                Ok(Some(delivery)) => deliveries.push(delivery),
                Ok(None) => {}
                // That message is delivered again when its lease ends; keep the others.
                Err(e) => {
                    tracing::warn!(error = %e, "work queue: could not take a delivered message");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if deliveries.is_empty() => Err(e),
            _ => Ok(deliveries),
        }
    }

    /// Runs one no-wait pull request to completion.
    async fn pull(
        &self,
        request: consumer::pull::FetchBuilder<'_>,
    ) -> Result<Vec<jetstream::Message>> {
        let mut batch = request
            .messages()
            .await
            .map_err(|e| self.error("fetch tasks", e))?;
        let mut out = Vec::new();
        while let Some(message) = batch.next().await {
            match message {
                Ok(message) => out.push(message),
                // Messages already received stay valid; the rest are redelivered later.
                Err(e) if !out.is_empty() => {
                    tracing::warn!(error = %e, "work queue: pull request ended with an error");
                    break;
                }
                Err(e) => return Err(self.error("fetch tasks", e)),
            }
        }
        Ok(out)
    }

    /// Turns a message into a delivery, or handles it here: a task beyond its attempt limit
    /// moves to the dead-letter list, a message that is not a task is terminated.
    async fn to_delivery(&self, message: jetstream::Message) -> Result<Option<Delivery>> {
        let (delivered, stream_sequence) = match message.info() {
            Ok(info) => (info.delivered, info.stream_sequence),
            Err(e) => return Err(self.error("read message metadata", e)),
        };
        let (message, acker) = message.split();
        let task: Task = match serde_json::from_slice(&message.payload) {
            Ok(task) => task,
            Err(e) => {
                tracing::error!(
                    subject = %message.subject,
                    stream_sequence,
                    error = %e,
                    "work queue: message in stream \"{STREAM}\" is not a Klio task; terminating it"
                );
                acker
                    .double_ack_with(AckKind::Term)
                    .await
                    .map_err(|e| self.error("terminate a foreign message", e))?;
                return Ok(None);
            }
        };
        let attempt = u32::try_from(delivered.max(1)).unwrap_or(u32::MAX);
        let lease = Lease {
            acker,
            stream_sequence,
        };
        if attempt > self.max_attempts {
            let attempts = attempt - 1;
            let error = format!(
                "attempt {attempts} was neither acked nor nakked before its lease expired (the worker crashed, stalled or was stopped)"
            );
            self.dead_letter(task, attempts, error, &lease).await?;
            return Ok(None);
        }
        Ok(Some(Delivery {
            task,
            attempt,
            token: Token::Nats(Box::new(lease)),
        }))
    }

    /// Writes the dead-letter entry, then removes the task from the stream.
    async fn dead_letter(
        &self,
        task: Task,
        attempts: u32,
        error: String,
        lease: &Lease,
    ) -> Result<()> {
        tracing::warn!(
            task = %task.id,
            kind = %task.kind,
            cluster = %task.cluster,
            attempts,
            error = %error,
            "work queue task failed for good, moved to the dead-letter list"
        );
        let entry = FailedTask {
            task,
            attempts,
            last_error: error,
            failed_at: time::OffsetDateTime::now_utc(),
        };
        let bytes = serde_json::to_vec(&entry).map_err(|source| Error::Corrupt {
            id: entry.task.id.clone(),
            source,
        })?;
        let action = || format!("record failed task \"{}\"", entry.task.id);
        self.js
            .publish(failed_subject(&entry.task.id), bytes.into())
            .await
            .map_err(|e| self.error(action(), e))?
            .await
            .map_err(|e| self.error(action(), e))?;
        lease
            .acker
            .double_ack()
            .await
            .map_err(|e| self.error(format!("remove failed task \"{}\"", entry.task.id), e))
    }
}

/// How Klio reaches NATS: the URL, the credentials and the TLS settings. The queue is a
/// trusted component (whoever can publish to it can ask for relays, retention and garbage
/// collection), so a production NATS should require credentials and TLS.
///
/// Secrets are read from files (trailing newlines ignored) and never shown: the URL's user
/// information is redacted in every message ([`redact_url`]).
#[derive(Clone, Default)]
pub struct NatsOptions {
    /// `nats://host:4222`, `tls://host:4222` (or with `user:password@`, redacted in messages).
    pub url: String,
    /// A credentials file (user JWT and nkey seed, as `nsc` writes it).
    pub creds_file: Option<PathBuf>,
    /// A file holding an nkey seed (`SU...`).
    pub nkey_file: Option<PathBuf>,
    /// A file holding an authentication token.
    pub token_file: Option<PathBuf>,
    /// A user name, with its password in `password_file`.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// CA certificates (PEM) that verify the NATS server; implies TLS.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and key (PEM) for NATS servers that verify clients.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Refuse a connection without TLS.
    pub require_tls: bool,
}

impl fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsOptions")
            .field("url", &redact_url(&self.url))
            .field("creds_file", &self.creds_file)
            .field("nkey_file", &self.nkey_file)
            .field("token_file", &self.token_file)
            .field("user", &self.user)
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("require_tls", &self.require_tls)
            .finish()
    }
}

/// `url` without its user information, and that information (`user:password` or a token).
fn split_userinfo(url: &str) -> (String, Option<String>) {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let mut userinfo = None;
    let servers: Vec<&str> = rest
        .split(',')
        .map(|server| match server.rsplit_once('@') {
            Some((info, host)) => {
                userinfo.get_or_insert_with(|| info.to_string());
                host
            }
            None => server,
        })
        .collect();
    let bare = match scheme {
        Some(s) => format!("{s}://{}", servers.join(",")),
        None => servers.join(","),
    };
    (bare, userinfo)
}

/// `url` with its user information (`user:password@`, a token) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let redacted: Vec<String> = rest
        .split(',')
        .map(|server| match server.rsplit_once('@') {
            Some((_, host)) => format!("***@{host}"),
            None => server.to_string(),
        })
        .collect();
    match scheme {
        Some(s) => format!("{s}://{}", redacted.join(",")),
        None => redacted.join(","),
    }
}

fn read_secret(path: &Path, what: &str, url: &str) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Nats {
        url: url.to_string(),
        action: format!("read the {what} file \"{}\"", path.display()),
        message: e.to_string(),
    })?;
    let secret = text.trim_end_matches(['\n', '\r']).to_string();
    if secret.is_empty() {
        return Err(Error::Nats {
            url: url.to_string(),
            action: format!("use the {what} file \"{}\"", path.display()),
            message: "it is empty".to_string(),
        });
    }
    Ok(secret)
}

impl NatsOptions {
    /// Options with only a URL.
    pub fn new(url: &str) -> NatsOptions {
        NatsOptions {
            url: url.to_string(),
            ..NatsOptions::default()
        }
    }

    /// The client options: at most one way of authenticating, then TLS.
    async fn connect_options(&self) -> Result<async_nats::ConnectOptions> {
        let url = redact_url(&self.url);
        let bad = |message: &str| Error::Nats {
            url: url.clone(),
            action: "configure the connection".to_string(),
            message: message.to_string(),
        };
        let ways = [
            self.creds_file.is_some(),
            self.nkey_file.is_some(),
            self.token_file.is_some(),
            self.user.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if ways > 1 {
            return Err(bad(
                "give one of a credentials file, an nkey seed file, a token file or a user",
            ));
        }
        if self.password_file.is_some() && self.user.is_none() {
            return Err(bad("a password file needs a user"));
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(bad(
                "a client certificate needs its key, and the key its certificate",
            ));
        }
        let mut o = async_nats::ConnectOptions::new();
        // The client library does not read credentials from the URL: they are taken here.
        if let (_, Some(info)) = split_userinfo(&self.url) {
            if ways > 0 {
                return Err(bad(
                    "the URL carries credentials and another way of authenticating is given: keep one",
                ));
            }
            o = match info.split_once(':') {
                Some((user, password)) => {
                    o.user_and_password(user.to_string(), password.to_string())
                }
                None => o.token(info),
            };
        }
        if let Some(p) = &self.creds_file {
            o = o.credentials_file(p).await.map_err(|e| Error::Nats {
                url: url.clone(),
                action: format!("read the credentials file \"{}\"", p.display()),
                message: e.to_string(),
            })?;
        }
        if let Some(p) = &self.nkey_file {
            o = o.nkey(read_secret(p, "nkey seed", &url)?);
        }
        if let Some(p) = &self.token_file {
            o = o.token(read_secret(p, "token", &url)?);
        }
        if let Some(user) = &self.user {
            let password = match &self.password_file {
                Some(p) => read_secret(p, "password", &url)?,
                None => String::new(),
            };
            o = o.user_and_password(user.clone(), password);
        }
        if let Some(ca) = &self.ca_file {
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            o = o.add_client_certificate(cert.clone(), key.clone());
        }
        if self.require_tls {
            o = o.require_tls(true);
        }
        Ok(o)
    }
}

impl NatsQueue {
    /// Ends the attempt of `delivery` with `error`: delivered again after `retry_after`, or
    /// dead-lettered when it was the last attempt or `reject` says it can never succeed.
    async fn end_attempt(
        &self,
        delivery: Delivery,
        retry_after: Duration,
        error: &str,
        reject: bool,
    ) -> Result<()> {
        let Delivery {
            task,
            attempt,
            token,
        } = delivery;
        let Token::Nats(lease) = token else {
            return Err(Error::ForeignDelivery { id: task.id });
        };
        if reject || attempt >= self.max_attempts {
            return self
                .dead_letter(task, attempt, error.to_string(), &lease)
                .await;
        }
        let delay = (!retry_after.is_zero()).then_some(retry_after);
        lease
            .acker
            .double_ack_with(AckKind::Nak(delay))
            .await
            .map_err(|e| self.error(format!("nak task \"{}\"", task.id), e))
    }

    async fn read_failed(&self, reader: &consumer::PullConsumer) -> Result<Vec<FailedTask>> {
        let mut out = Vec::new();
        loop {
            let batch = self.pull(reader.fetch().max_messages(256)).await?;
            let Some(last) = batch.last() else {
                return Ok(out);
            };
            last.ack()
                .await
                .map_err(|e| self.error("list failed tasks", e))?;
            for message in &batch {
                let entry: FailedTask =
                    serde_json::from_slice(&message.payload).map_err(|source| Error::Corrupt {
                        id: message.subject.to_string(),
                        source,
                    })?;
                out.push(entry);
            }
        }
    }
}

fn consumer_config(lease: Duration) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(CONSUMER.to_string()),
        description: Some("Klio workers".to_string()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: lease,
        max_deliver: -1,
        filter_subject: format!("{SUBJECT_PREFIX}.>"),
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    }
}

impl WorkQueue for NatsQueue {
    fn enqueue(&self, task: Task) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            task.validate()?;
            self.publish(&task).await
        })
    }

    fn fetch(&self, max: usize, lease: Duration) -> BoxFuture<'_, Result<Vec<Delivery>>> {
        Box::pin(self.fetch_impl(max, lease))
    }

    fn ack(&self, delivery: Delivery) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let lease = self.lease_of(&delivery)?;
            lease
                .acker
                .double_ack()
                .await
                .map_err(|e| self.error(format!("ack task \"{}\"", delivery.task.id), e))
        })
    }

    fn nak<'a>(
        &'a self,
        delivery: Delivery,
        retry_after: Duration,
        error: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.end_attempt(delivery, retry_after, error, false))
    }

    fn reject<'a>(&'a self, delivery: Delivery, error: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.end_attempt(delivery, Duration::ZERO, error, true))
    }

    fn keep_alive<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let lease = self.lease_of(delivery)?;
            lease
                .acker
                .double_ack_with(AckKind::Progress)
                .await
                .map_err(|e| {
                    self.error(
                        format!("extend the lease of task \"{}\"", delivery.task.id),
                        e,
                    )
                })?;
            // The server confirms progress also for a lease it already gave up; it cannot tell.
            Ok(true)
        })
    }

    fn list_failed(&self) -> BoxFuture<'_, Result<Vec<FailedTask>>> {
        Box::pin(async move {
            let action = "list failed tasks";
            // A short-lived consumer; pull consumers on 2.9 need an ack policy, and acking
            // the last message of each batch keeps the ack-pending limit out of the way.
            let reader: consumer::PullConsumer = self
                .failed
                .create_consumer(consumer::pull::Config {
                    description: Some("klio admin queue list-failed".to_string()),
                    ack_policy: consumer::AckPolicy::All,
                    deliver_policy: consumer::DeliverPolicy::All,
                    filter_subject: format!("{FAILED_PREFIX}.>"),
                    inactive_threshold: Duration::from_secs(60),
                    ..Default::default()
                })
                .await
                .map_err(|e| self.error(action, e))?;
            let result = self.read_failed(&reader).await;
            let name = reader.cached_info().name.clone();
            if let Err(e) = self.failed.delete_consumer(&name).await {
                tracing::debug!(error = %e, "work queue: could not delete a list-failed consumer");
            }
            let mut out = result?;
            out.sort_by(|a, b| {
                a.failed_at
                    .cmp(&b.failed_at)
                    .then_with(|| a.task.id.cmp(&b.task.id))
            });
            Ok(out)
        })
    }

    fn retry_failed<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let subject = failed_subject(id);
            let action = || format!("retry failed task \"{id}\"");
            let message = match self.failed.get_last_raw_message_by_subject(&subject).await {
                Ok(message) => message,
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                    return Ok(false);
                }
                Err(e) => return Err(self.error(action(), e)),
            };
            let entry: FailedTask =
                serde_json::from_slice(&message.payload).map_err(|source| Error::Corrupt {
                    id: id.to_string(),
                    source,
                })?;
            // Enqueue first: a crash before the purge leaves the task pending and listed,
            // and retrying again only removes the entry.
            self.publish(&entry.task).await?;
            self.failed
                .purge()
                .filter(subject)
                .await
                .map_err(|e| self.error(action(), e))?;
            Ok(true)
        })
    }

    fn pending_count(&self) -> BoxFuture<'_, Result<usize>> {
        Box::pin(async move {
            let mut stream = self.stream.clone();
            let info = stream
                .info()
                .await
                .map_err(|e| self.error(format!("read stream \"{STREAM}\""), e))?;
            Ok(usize::try_from(info.state.messages).unwrap_or(usize::MAX))
        })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn urls_are_shown_without_their_secrets() {
        assert_eq!(super::redact_url("nats://u:p@h:4222"), "nats://***@h:4222");
        assert_eq!(super::redact_url("tls://tok@a:1,b:2"), "tls://***@a:1,b:2");
        assert_eq!(super::redact_url("nats://h:4222"), "nats://h:4222");
        assert_eq!(super::redact_url("u:p@h"), "***@h");
        assert_eq!(
            super::split_userinfo("nats://u:p@a:1,b:2"),
            ("nats://a:1,b:2".to_string(), Some("u:p".to_string()))
        );
        assert_eq!(
            super::split_userinfo("nats://a:1"),
            ("nats://a:1".to_string(), None)
        );
        let o = super::NatsOptions::new("nats://user:secret@h:4222");
        assert!(!format!("{o:?}").contains("secret"));
    }
    use super::*;

    #[test]
    fn subject_token_keeps_safe_characters_and_escapes_the_rest() {
        assert_eq!(subject_token("pg-main_1"), "pg-main_1");
        assert_eq!(subject_token("a.b"), "a=2Eb");
        assert_eq!(subject_token("x y*>="), "x=20y=2A=3E=3D");
        assert_eq!(subject_token("é"), "=C3=A9");
    }

    #[test]
    fn task_subject_has_one_token_per_field() {
        let task = Task::new(
            "000000010000000000000002",
            "wal-relay",
            "db.prod",
            serde_json::Value::Null,
        );
        assert_eq!(
            task_subject(&task),
            "klio.tasks.wal-relay.db=2Eprod.000000010000000000000002"
        );
    }
}
