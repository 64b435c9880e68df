//! Accepting connections without letting them exhaust the server. Each accepted socket
//! takes a permit from the server's connection limit (past it, the socket is closed at
//! once) and must complete its TLS handshake — or, in plaintext, send its first bytes —
//! within `first_bytes_timeout_ms`; handshakes run on their own tasks, so a slow or
//! silent peer never holds up the next accept. The HTTP/2 limits (streams per
//! connection, header size, keep-alive, connection age) are set on the server builder
//! (`server.rs`) from the same section.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, OwnedSemaphorePermit, Semaphore},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// The `[server.connections]` section of every service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionConfig {
    /// Connections held at once per port; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Time a new connection has to finish its TLS handshake, or in plaintext to send its
    /// first bytes, before it is closed.
    pub first_bytes_timeout_ms: u64,
    /// Calls in flight at once on one connection (HTTP/2 streams).
    pub max_concurrent_streams: u32,
    /// Largest header block of a call (bytes).
    pub max_header_list_bytes: u32,
    /// HTTP/2 ping interval, and how long an unanswered ping may wait before the
    /// connection is closed as dead.
    pub keepalive_interval_ms: u64,
    pub keepalive_timeout_ms: u64,
    /// Connections are told to go away (GOAWAY, in-flight calls finish) after this long,
    /// so that no connection, idle or not, is held forever; 0 for never.
    pub max_connection_age_ms: u64,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        Self {
            max_connections: 4_096,
            first_bytes_timeout_ms: 5_000,
            max_concurrent_streams: 256,
            max_header_list_bytes: 16 * 1024,
            keepalive_interval_ms: 30_000,
            keepalive_timeout_ms: 10_000,
            max_connection_age_ms: 30 * 60 * 1000,
        }
    }
}

/// A connection holding its permit of the connection limit until it is dropped.
pub struct Limited<T> {
    io: T,
    _permit: OwnedSemaphorePermit,
}

/// Accepted, limited, handshaken connections of `listener`, for `serve_with_incoming`.
/// `handshake` turns a socket into the served stream (TLS, or a check for first bytes).
/// The accept loop stops, releasing the port, once the stream is dropped.
pub(crate) fn incoming<T, H, F>(
    listener: TcpListener,
    label: &'static str,
    config: &ConnectionConfig,
    handshake: H,
) -> ReceiverStream<io::Result<Limited<T>>>
where
    T: Send + 'static,
    H: Fn(TcpStream) -> F + Send + 'static,
    F: Future<Output = io::Result<T>> + Send + 'static,
{
    let (sender, receiver) = mpsc::channel(256);
    let permits = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let first_bytes_timeout = Duration::from_millis(config.first_bytes_timeout_ms.max(1));
    let refused = move |reason: &str| crate::metrics::CONNECTIONS_REFUSED.with_label_values(&[label, reason]).inc();
    refused_init(label);
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Out of file descriptors, most likely: back off rather than spin.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = sender.closed() => return,
            };
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                refused("limit");
                continue;
            };
            // gRPC writes small frames: Nagle plus delayed ACKs would add tens of ms.
            let _ = stream.set_nodelay(true);
            let sender = sender.clone();
            let handshaken = handshake(stream);
            tokio::spawn(async move {
                match tokio::time::timeout(first_bytes_timeout, handshaken).await {
                    Ok(Ok(io)) => {
                        let _ = sender.send(Ok(Limited { io, _permit: permit })).await;
                    }
                    Ok(Err(error)) => {
                        refused("handshake");
                        tracing::debug!(%error, "connection closed before serving");
                    }
                    Err(_) => refused("handshake"),
                }
            });
        }
    });
    ReceiverStream::new(receiver)
}

/// Series exist from the start, at zero, so alerts see them before the first refusal.
fn refused_init(label: &str) {
    for reason in ["limit", "handshake"] {
        crate::metrics::CONNECTIONS_REFUSED.with_label_values(&[label, reason]).inc_by(0);
    }
}

/// The plaintext "handshake": the peer must send something (the HTTP/2 preface) in time.
pub(crate) async fn first_bytes(stream: TcpStream) -> io::Result<TcpStream> {
    let mut byte = [0u8; 1];
    match stream.peek(&mut byte).await? {
        0 => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before sending anything")),
        _ => Ok(stream),
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Limited<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Limited<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for Limited<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio_stream::StreamExt;

    use super::*;

    fn config(max_connections: usize, first_bytes_timeout_ms: u64) -> ConnectionConfig {
        ConnectionConfig { max_connections, first_bytes_timeout_ms, ..ConnectionConfig::default() }
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_and_does_not_block_the_next() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut accepted = incoming(listener, "test", &config(10, 200), first_bytes);
        let mut silent = TcpStream::connect(address).await.unwrap();
        let mut talking = TcpStream::connect(address).await.unwrap();
        talking.write_all(b"PRI").await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), accepted.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(first.io.peer_addr().unwrap(), talking.local_addr().unwrap());
        // The silent one is closed by the server after the timeout.
        let mut buffer = [0u8; 1];
        let read =
            tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut silent, &mut buffer));
        assert_eq!(read.await.unwrap().unwrap(), 0, "the server closed the silent connection");
    }

    #[tokio::test]
    async fn past_the_limit_a_connection_is_closed_until_one_is_released() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut accepted = incoming(listener, "test", &config(1, 5_000), first_bytes);
        let mut first = TcpStream::connect(address).await.unwrap();
        first.write_all(b"x").await.unwrap();
        let held = accepted.next().await.unwrap().unwrap();
        let mut second = TcpStream::connect(address).await.unwrap();
        let mut buffer = [0u8; 1];
        let read =
            tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut second, &mut buffer));
        assert_eq!(read.await.unwrap().unwrap_or(0), 0, "over the limit: closed at once");
        drop(held);
        let mut third = TcpStream::connect(address).await.unwrap();
        third.write_all(b"x").await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), accepted.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(next.io.peer_addr().unwrap(), third.local_addr().unwrap());
    }
}
