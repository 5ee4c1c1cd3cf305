//! The simulator as a real HTTP/1.1 server on a port.

use crate::Simulator;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::time::Duration;

/// The pause after a failed accept (such as running out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
use hyper_util::service::TowerToHyperService;
use std::io;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running server. Dropping it does not stop it; call [`ServerHandle::shutdown`].
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    sim: Simulator,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ServerHandle {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://{addr}`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The simulator behind it (for its audit).
    pub fn simulator(&self) -> &Simulator {
        &self.sim
    }

    /// Stops accepting connections, closes the open ones and waits for the accept loop to end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// How the server treats its connections (see [`serve_with`]).
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct ServeOptions {
    /// How long a connection may take to send a request's headers, or stay idle between requests
    /// (default 10 s): slow or silent clients cannot pin a connection, and its file descriptor,
    /// for longer.
    pub header_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
        }
    }
}

impl ServeOptions {
    /// Sets [`ServeOptions::header_timeout`].
    ///
    /// # Panics
    ///
    /// If `timeout` is zero.
    pub fn header_timeout(self, timeout: Duration) -> Self {
        assert!(
            !timeout.is_zero(),
            "a header timeout of zero closes every connection"
        );
        Self {
            header_timeout: timeout,
        }
    }
}

/// Serves `sim` on `addr` (port 0 picks a free port) until [`ServerHandle::shutdown`], with the
/// default [`ServeOptions`].
///
/// Every connection is HTTP/1.1 with keep-alive. A simulated connection reset makes the service
/// fail, and hyper then closes the connection without a response, as a reset looks to a client.
pub async fn serve(sim: Simulator, addr: SocketAddr) -> io::Result<ServerHandle> {
    serve_with(sim, addr, ServeOptions::default()).await
}

/// As [`serve`], with `options`.
pub async fn serve_with(
    sim: Simulator,
    addr: SocketAddr,
    options: ServeOptions,
) -> io::Result<ServerHandle> {
    let header_timeout = options.header_timeout;
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (stop, mut stopped) = watch::channel(false);
    let service = sim.clone();
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    // Out of file descriptors (or another transient failure): wait a little
                    // instead of spinning, so the connections being served can finish.
                    Err(_) => {
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
                _ = stopped.changed() => break,
            };
            let svc = TowerToHyperService::new(service.clone());
            let mut stop_conn = stopped.clone();
            tokio::spawn(async move {
                // A connection must send a request's headers within the header timeout (idle
                // keep-alive connections included): slow or silent clients cannot pin it.
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = stop_conn.changed() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
    });
    Ok(ServerHandle {
        addr,
        sim,
        stop,
        task,
    })
}
