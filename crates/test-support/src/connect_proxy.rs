//! An HTTP `CONNECT` proxy on loopback that maps the names a Go program dials (such as
//! `<service>.<namespace>.svc:<port>`) to loopback addresses the test chose.
//!
//! grpc-go honours `HTTPS_PROXY`, and with a proxy set it does not resolve a `dns` target
//! itself: it sends `CONNECT <host>:<port>` to the proxy. Started with
//! `HTTPS_PROXY=http://<ConnectProxy::addr>`, the CloudNativePG operator therefore reaches a
//! plugin "Service" that only exists as a process on 127.0.0.1 (see
//! `/work/shared/notes/k8s-real-env.md` §4.3). The TLS session runs end to end through the tunnel.
//!
//! The proxy only ever connects to loopback addresses registered with [`ConnectProxy::route`];
//! any other request is answered `403 Forbidden` and recorded in [`ConnectProxy::events`].

#![allow(clippy::unwrap_used)] // test fixture: a poisoned lock is a panic in another test thread

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};

/// The longest request head accepted (`CONNECT` line and headers).
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request head, and the proxy to reach a target.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP `CONNECT` proxy on `127.0.0.1:<free port>`, stopped on drop (its listener and every
/// open tunnel are closed).
pub struct ConnectProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    routes: Mutex<HashMap<String, SocketAddr>>,
    events: Mutex<Vec<String>>,
    /// Both ends of every tunnel, shut down when the proxy stops.
    open: Mutex<Vec<TcpStream>>,
    stopping: AtomicBool,
}

impl Shared {
    fn record(&self, event: String) {
        eprintln!("connect-proxy: {event}");
        self.events.lock().unwrap().push(event);
    }
}

impl ConnectProxy {
    /// Binds `127.0.0.1:0` and starts accepting connections on a thread of its own.
    pub fn start() -> anyhow::Result<ConnectProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the CONNECT proxy")?;
        let addr = listener
            .local_addr()
            .context("read the CONNECT proxy's address")?;
        let shared = Arc::new(Shared::default());
        let accept = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("connect-proxy".into())
                .spawn(move || accept_loop(&listener, &shared))
                .context("start the CONNECT proxy's thread")?
        };
        Ok(ConnectProxy {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The proxy's address (`127.0.0.1:<port>`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's URL, for `HTTPS_PROXY` (`http://127.0.0.1:<port>`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends `CONNECT <authority>` (`host:port`, e.g. `klio-plugin.cnpg-system.svc:9090`) to
    /// `target`, replacing an earlier route of that authority. Fails unless `target` is a
    /// loopback address: the proxy never connects anywhere else.
    pub fn route(&self, authority: &str, target: SocketAddr) -> anyhow::Result<()> {
        if !target.ip().is_loopback() {
            bail!("refusing to route \"{authority}\" to {target}: not a loopback address");
        }
        if authority
            .rsplit_once(':')
            .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        {
            bail!("invalid authority \"{authority}\"\nHINT: write it as host:port");
        }
        self.shared
            .routes
            .lock()
            .unwrap()
            .insert(authority.to_ascii_lowercase(), target);
        Ok(())
    }

    /// What the proxy did so far, one line per request: `CONNECT <authority> -> <target>`,
    /// `refused CONNECT <authority>: no route`, and the like.
    pub fn events(&self) -> Vec<String> {
        self.shared.events.lock().unwrap().clone()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop; it sees `stopping` and returns.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for stream in self.shared.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("connect-proxy-conn".into())
            .spawn(move || {
                if let Err(e) = serve(stream, &shared) {
                    shared.record(format!("connection failed: {e:#}"));
                }
            });
        if let Err(e) = spawned {
            eprintln!("connect-proxy: cannot start a connection thread: {e}");
        }
    }
}

/// Reads one request head, then either tunnels to the routed target or answers with an error.
fn serve(mut client: TcpStream, shared: &Shared) -> anyhow::Result<()> {
    client.set_read_timeout(Some(HEAD_TIMEOUT))?;
    let (head, rest) = read_head(&mut client)?;
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    let (method, authority) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "CONNECT" {
        shared.record(format!("refused {line:?}: only CONNECT is served"));
        return respond(&mut client, "403 Forbidden", "only CONNECT is served\n");
    }
    let target = shared
        .routes
        .lock()
        .unwrap()
        .get(&authority.to_ascii_lowercase())
        .copied();
    let Some(target) = target else {
        shared.record(format!("refused CONNECT {authority}: no route"));
        return respond(
            &mut client,
            "403 Forbidden",
            &format!("no route for {authority}\n"),
        );
    };
    let mut upstream = match TcpStream::connect_timeout(&target, HEAD_TIMEOUT) {
        Ok(upstream) => upstream,
        Err(e) => {
            shared.record(format!("CONNECT {authority} -> {target} failed: {e}"));
            return respond(
                &mut client,
                "502 Bad Gateway",
                &format!("cannot connect to {target}: {e}\n"),
            );
        }
    };
    shared.record(format!("CONNECT {authority} -> {target}"));
    // Registered before the client hears back, so a proxy dropped after that closes this
    // tunnel too; `stopping` is checked under the same lock `Drop` drains the list with.
    {
        let mut open = shared.open.lock().unwrap();
        if shared.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        open.push(client.try_clone()?);
        open.push(upstream.try_clone()?);
    }
    client.set_read_timeout(None)?;
    client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    // Bytes the client sent after the head already belong to the tunnel.
    upstream.write_all(&rest)?;
    let upstream_reader = upstream.try_clone()?;
    let client_writer = client.try_clone()?;
    let down = std::thread::Builder::new()
        .name("connect-proxy-down".into())
        .spawn(move || pipe(upstream_reader, client_writer))?;
    pipe(client, upstream);
    let _ = down.join();
    Ok(())
}

/// Copies `from` to `to` until end of file or an error, then ends the write side of `to`.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// Reads up to the end of the request head (`\r\n\r\n`); returns the head and whatever bytes
/// followed it.
fn read_head(stream: &mut TcpStream) -> anyhow::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > MAX_HEAD {
            bail!("request head longer than {MAX_HEAD} bytes");
        }
        let n = stream.read(&mut chunk).context("read the request head")?;
        if n == 0 {
            bail!("connection closed before the end of the request head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn respond(client: &mut TcpStream, status: &str, body: &str) -> anyhow::Result<()> {
    write!(
        client,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    client.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `request` to the proxy and returns the status line of its answer and the stream.
    fn ask(proxy: &ConnectProxy, request: &str) -> (String, TcpStream) {
        let mut stream = TcpStream::connect(proxy.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let (head, rest) = read_head(&mut stream).unwrap();
        assert!(rest.is_empty() || !head.starts_with("HTTP/1.1 200"));
        (head.lines().next().unwrap().to_string(), stream)
    }

    #[test]
    fn connect_routed_authority_tunnels_both_ways() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = echo.accept().unwrap();
            let mut buf = [0u8; 5];
            conn.read_exact(&mut buf).unwrap();
            conn.write_all(&buf.to_ascii_uppercase()).unwrap();
        });
        let proxy = ConnectProxy::start().unwrap();
        proxy
            .route("klio-plugin.cnpg-system.svc:9090", echo_addr)
            .unwrap();

        let (status, mut stream) = ask(
            &proxy,
            "CONNECT KLIO-plugin.cnpg-system.svc:9090 HTTP/1.1\r\nHost: klio-plugin.cnpg-system.svc:9090\r\n\r\n",
        );
        assert_eq!(status, "HTTP/1.1 200 Connection established");
        stream.write_all(b"hello").unwrap();
        let mut answer = [0u8; 5];
        stream.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"HELLO");
        server.join().unwrap();
        // The target closed its side: the tunnel ends.
        assert_eq!(stream.read(&mut answer).unwrap(), 0);
        assert_eq!(
            proxy.events(),
            [format!(
                "CONNECT KLIO-plugin.cnpg-system.svc:9090 -> {echo_addr}"
            )]
        );
    }

    #[test]
    fn connect_unknown_authority_is_refused_with_403() {
        let proxy = ConnectProxy::start().unwrap();
        proxy
            .route(
                "klio-plugin.cnpg-system.svc:9090",
                "127.0.0.1:9".parse().unwrap(),
            )
            .unwrap();
        let (status, _) = ask(
            &proxy,
            "CONNECT other.cnpg-system.svc:9090 HTTP/1.1\r\nHost: other.cnpg-system.svc:9090\r\n\r\n",
        );
        assert_eq!(status, "HTTP/1.1 403 Forbidden");
        let (status, _) = ask(
            &proxy,
            "CONNECT klio-plugin.cnpg-system.svc:9091 HTTP/1.1\r\n\r\n",
        );
        assert_eq!(status, "HTTP/1.1 403 Forbidden");
        let (status, _) = ask(&proxy, "GET http://example.com/ HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 403 Forbidden");
        assert_eq!(
            proxy.events(),
            [
                "refused CONNECT other.cnpg-system.svc:9090: no route",
                "refused CONNECT klio-plugin.cnpg-system.svc:9091: no route",
                "refused \"GET http://example.com/ HTTP/1.1\": only CONNECT is served",
            ]
        );
    }

    #[test]
    fn route_to_non_loopback_address_is_an_error() {
        let proxy = ConnectProxy::start().unwrap();
        let err = proxy
            .route("x.ns.svc:443", "198.51.100.7:443".parse().unwrap())
            .unwrap_err();
        assert!(err.to_string().contains("not a loopback address"), "{err}");
        assert!(
            proxy
                .route("no-port", "127.0.0.1:1".parse().unwrap())
                .is_err()
        );
    }

    #[test]
    fn drop_closes_open_tunnels() {
        let target = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = ConnectProxy::start().unwrap();
        proxy
            .route("a.b.svc:1", target.local_addr().unwrap())
            .unwrap();
        let (status, mut stream) = ask(&proxy, "CONNECT a.b.svc:1 HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 Connection established");
        let (_held, _) = target.accept().unwrap();
        drop(proxy);
        let mut buf = [0u8; 1];
        assert_eq!(stream.read(&mut buf).unwrap(), 0);
    }
}
