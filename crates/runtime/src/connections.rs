//! Accepting connections without letting them exhaust the server. Each accepted socket
//! takes a permit from the server's connection limit (past it, the socket is closed at
//! once) and must complete its TLS handshake — or, in plaintext, send the whole HTTP/2
//! client preface — within `first_bytes_timeout_ms`; handshakes run on their own tasks,
//! so a slow or silent peer never holds up the next accept. (hyper's HTTP/2 handshake has
//! no timeout of its own: a peer that stopped inside the preface would hold its permit
//! for ever.) The HTTP/2 limits (streams per
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
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
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
    /// Time a new connection has to send the HTTP/2 client preface (after its TLS
    /// handshake, with TLS on) before it is closed.
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

/// What every HTTP/2 client sends first (RFC 9113, section 3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The plaintext "handshake": the peer must send the whole HTTP/2 client preface (the
/// caller bounds the wait). The bytes are only peeked: hyper reads them again.
pub(crate) async fn http2_preface(stream: TcpStream) -> io::Result<TcpStream> {
    let mut seen = [0u8; HTTP2_PREFACE.len()];
    loop {
        let read = stream.peek(&mut seen).await?;
        if read == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the HTTP/2 preface"));
        }
        if seen[..read] != HTTP2_PREFACE[..read] {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not an HTTP/2 client preface"));
        }
        if read == HTTP2_PREFACE.len() {
            return Ok(stream);
        }
        // Part of it so far: peek would answer at once again, so wait a little.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The same check inside an encrypted stream, which cannot be peeked: the preface is read
/// and handed back to hyper first by [`Rewound`].
pub(crate) async fn http2_preface_in<T: AsyncRead + Unpin>(mut stream: T) -> io::Result<Rewound<T>> {
    let mut preface = [0u8; HTTP2_PREFACE.len()];
    stream.read_exact(&mut preface).await?;
    if &preface != HTTP2_PREFACE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not an HTTP/2 client preface"));
    }
    Ok(Rewound { prefix: preface, replayed: 0, inner: stream })
}

/// A stream whose first bytes were already read: they are read again first.
pub struct Rewound<T> {
    prefix: [u8; HTTP2_PREFACE.len()],
    replayed: usize,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewound<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.replayed < self.prefix.len() {
            let rest = &self.prefix[self.replayed..];
            let count = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..count]);
            self.replayed += count;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewound<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for Rewound<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    use super::*;

    fn config(max_connections: usize, first_bytes_timeout_ms: u64) -> ConnectionConfig {
        ConnectionConfig { max_connections, first_bytes_timeout_ms, ..ConnectionConfig::default() }
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_and_does_not_block_the_next() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut accepted = incoming(listener, "test", &config(10, 200), http2_preface);
        let mut silent = TcpStream::connect(address).await.unwrap();
        let mut stalled = TcpStream::connect(address).await.unwrap();
        stalled.write_all(&HTTP2_PREFACE[..10]).await.unwrap();
        let mut talking = TcpStream::connect(address).await.unwrap();
        talking.write_all(HTTP2_PREFACE).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), accepted.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(first.io.peer_addr().unwrap(), talking.local_addr().unwrap());
        // The silent one is closed by the server after the timeout.
        let mut buffer = [0u8; 1];
        let read =
            tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut silent, &mut buffer));
        assert_eq!(read.await.unwrap().unwrap(), 0, "the server closed the silent connection");
    }

    #[tokio::test]
    async fn the_preface_read_from_an_encrypted_stream_is_read_again_first() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(HTTP2_PREFACE).await.unwrap();
        client.write_all(b"then the frames").await.unwrap();
        drop(client);
        let mut rewound = http2_preface_in(server).await.unwrap();
        let mut everything = Vec::new();
        rewound.read_to_end(&mut everything).await.unwrap();
        assert_eq!(everything, [&HTTP2_PREFACE[..], b"then the frames"].concat());
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        assert!(http2_preface_in(server).await.is_err());
    }

    #[tokio::test]
    async fn a_connection_that_does_not_speak_http2_is_closed_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let _accepted = incoming(listener, "test", &config(10, 60_000), http2_preface);
        let mut http1 = TcpStream::connect(address).await.unwrap();
        http1.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buffer = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut http1, &mut buffer));
        assert_eq!(read.await.expect("closed well before the timeout").unwrap_or(0), 0);
    }

    #[tokio::test]
    async fn past_the_limit_a_connection_is_closed_until_one_is_released() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut accepted = incoming(listener, "test", &config(1, 5_000), http2_preface);
        let mut first = TcpStream::connect(address).await.unwrap();
        first.write_all(HTTP2_PREFACE).await.unwrap();
        let held = accepted.next().await.unwrap().unwrap();
        let mut second = TcpStream::connect(address).await.unwrap();
        let mut buffer = [0u8; 1];
        let read =
            tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut second, &mut buffer));
        assert_eq!(read.await.unwrap().unwrap_or(0), 0, "over the limit: closed at once");
        drop(held);
        let mut third = TcpStream::connect(address).await.unwrap();
        third.write_all(HTTP2_PREFACE).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), accepted.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(next.io.peer_addr().unwrap(), third.local_addr().unwrap());
    }
}
