//! Polling until a condition holds, with a timeout that says what was awaited.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::bail;

/// Calls `f` every `poll` until it returns `Ok(true)`, failing after `timeout` with a message
/// naming `what` and the last error `f` returned (errors count as "not yet").
pub fn wait_until(
    timeout: Duration,
    poll: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            return timed_out(timeout, what, last_error);
        }
        std::thread::sleep(poll);
    }
}

/// [`wait_until`] for async conditions; sleeps with `tokio::time::sleep` so other tasks (such as
/// a `tokio_postgres` connection) keep running.
pub async fn wait_until_async<F, Fut>(
    timeout: Duration,
    poll: Duration,
    what: &str,
    mut f: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match f().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            return timed_out(timeout, what, last_error);
        }
        tokio::time::sleep(poll).await;
    }
}

fn timed_out(
    timeout: Duration,
    what: &str,
    last_error: Option<anyhow::Error>,
) -> anyhow::Result<()> {
    match last_error {
        Some(e) => bail!("timed out after {timeout:?} waiting for {what} (last error: {e:#})"),
        None => bail!("timed out after {timeout:?} waiting for {what}"),
    }
}
