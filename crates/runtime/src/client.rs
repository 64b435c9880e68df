//! Channels to downstream services. Connections are lazy so that a service can start
//! before its dependencies and recover when they come back.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// Builds a lazily connecting channel to `address` (`host:port` or a full `http://` URI).
pub fn lazy_channel(address: &str, connect_timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    let uri = if address.contains("://") { address.to_string() } else { format!("http://{address}") };
    Ok(Endpoint::from_shared(uri)?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .connect_lazy())
}

/// `host:port` as a plaintext gRPC URI; full URIs pass through unchanged.
pub fn endpoint_uri(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}
