//! Mutual TLS between services, on by configuration. One [`Tls`] per process holds both
//! sides: what its servers present and require (a client certificate signed by the
//! configured CA), and what its clients present and trust. The three PEM files are read
//! again every `reload_ms`; a change takes effect for new connections, so certificates
//! rotate without a restart (a Kubernetes Secret update swaps the mounted files). A file
//! that does not parse is logged and the previous certificates keep serving.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, RwLock, Weak},
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// The `[server.tls]` section of every service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Serve and call only over mutual TLS: a plaintext connection is refused.
    pub enabled: bool,
    /// PEM file of the CA certificates trusted for peers, as servers and as clients.
    pub ca_file: String,
    /// PEM certificate chain this service presents, both as a server and as a client.
    pub cert_file: String,
    /// PEM private key of `cert_file`.
    pub key_file: String,
    /// How often the three files are read again to pick up rotated certificates.
    pub reload_ms: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            ca_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            reload_ms: 5_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.enabled needs ca_file, cert_file and key_file")]
    MissingFile,
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("the TLS configuration was rejected: {0}")]
    Rejected(String),
}

/// Plaintext, or mutual TLS from reloading files. Cloning is cheap and shares the files'
/// current contents.
#[derive(Clone, Default)]
pub struct Tls {
    reloading: Option<Arc<Reloading>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.reloading.is_some() { "Tls(mutual)" } else { "Tls(plaintext)" })
    }
}

struct Reloading {
    config: TlsConfig,
    current: RwLock<Arc<Loaded>>,
}

/// The files' bytes (to notice a change) and the rustls configurations built from them.
struct Loaded {
    files: [Vec<u8>; 3],
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl Tls {
    pub fn plaintext() -> Self {
        Self::default()
    }

    /// Reads the files now (a bad file fails the start) and, inside a Tokio runtime,
    /// watches them for as long as a clone of the returned value lives.
    pub fn load(config: &TlsConfig) -> Result<Self, TlsError> {
        if !config.enabled {
            return Ok(Self::plaintext());
        }
        if config.ca_file.is_empty() || config.cert_file.is_empty() || config.key_file.is_empty() {
            return Err(TlsError::MissingFile);
        }
        let loaded = Loaded::build(read_files(config)?, config)?;
        let reloading = Arc::new(Reloading { config: config.clone(), current: RwLock::new(Arc::new(loaded)) });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(watch(Arc::downgrade(&reloading)));
        }
        Ok(Self { reloading: Some(reloading) })
    }

    pub fn is_enabled(&self) -> bool {
        self.reloading.is_some()
    }

    fn current(&self) -> Option<Arc<Loaded>> {
        let reloading = self.reloading.as_ref()?;
        Some(Arc::clone(&reloading.current.read().unwrap_or_else(std::sync::PoisonError::into_inner)))
    }

    /// The acceptor for a new connection, with the certificates current now.
    pub fn acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.current().map(|loaded| tokio_rustls::TlsAcceptor::from(Arc::clone(&loaded.server)))
    }

    /// The connector for client channels (see `client::lazy_channel`); `None` for plaintext.
    pub fn connector(&self) -> Option<TlsConnect> {
        self.is_enabled().then(|| TlsConnect { tls: self.clone() })
    }
}

fn read_files(config: &TlsConfig) -> Result<[Vec<u8>; 3], TlsError> {
    let read = |path: &str| std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_string(), source });
    Ok([read(&config.ca_file)?, read(&config.cert_file)?, read(&config.key_file)?])
}

impl Loaded {
    fn build(files: [Vec<u8>; 3], config: &TlsConfig) -> Result<Self, TlsError> {
        let [ca, cert, key] = &files;
        let invalid = |path: &str, message: String| TlsError::Invalid { path: path.to_string(), message };
        let certificates = |bytes: &[u8], path: &str| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let certificates = CertificateDer::pem_slice_iter(bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| invalid(path, error.to_string()))?;
            if certificates.is_empty() {
                return Err(invalid(path, "no PEM certificate in the file".to_string()));
            }
            Ok(certificates)
        };
        let mut roots = rustls::RootCertStore::empty();
        for certificate in certificates(ca, &config.ca_file)? {
            roots.add(certificate).map_err(|error| invalid(&config.ca_file, error.to_string()))?;
        }
        let roots = Arc::new(roots);
        let chain = certificates(cert, &config.cert_file)?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|error| invalid(&config.key_file, error.to_string()))?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let rejected = |error: rustls::Error| TlsError::Rejected(error.to_string());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()
                .map_err(|error| TlsError::Rejected(error.to_string()))?;
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(rejected)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(rejected)?;
        // gRPC clients (grpc-go, so grpcurl too) insist on HTTP/2 negotiated by ALPN.
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(rejected)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(rejected)?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self { files, server: Arc::new(server), client: Arc::new(client) })
    }
}

/// Re-reads the files while the `Tls` lives; swaps in new configurations on a change.
async fn watch(reloading: Weak<Reloading>) {
    loop {
        let every = match reloading.upgrade() {
            Some(reloading) => Duration::from_millis(reloading.config.reload_ms.max(10)),
            None => return,
        };
        tokio::time::sleep(every).await;
        let Some(reloading) = reloading.upgrade() else { return };
        let files = match read_files(&reloading.config) {
            Ok(files) => files,
            Err(error) => {
                tracing::warn!(%error, "TLS files unreadable; the current certificates stay");
                continue;
            }
        };
        let unchanged = reloading.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).files == files;
        if unchanged {
            continue;
        }
        match Loaded::build(files, &reloading.config) {
            Ok(loaded) => {
                *reloading.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(loaded);
                crate::metrics::TLS_RELOADS.with_label_values(&["loaded"]).inc();
                tracing::info!(cert = %reloading.config.cert_file, "TLS certificates reloaded");
            }
            Err(error) => {
                crate::metrics::TLS_RELOADS.with_label_values(&["rejected"]).inc();
                tracing::error!(%error, "new TLS files rejected; the current certificates stay");
            }
        }
    }
}

/// Connects a client channel over TCP and TLS, verifying the server's name (the host of
/// the address) against the CA and presenting this service's certificate.
#[derive(Clone)]
pub struct TlsConnect {
    tls: Tls,
}

impl tower::Service<http::Uri> for TlsConnect {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let client = self.tls.current().map(|loaded| Arc::clone(&loaded.client));
        Box::pin(async move {
            let client = client.ok_or_else(|| io::Error::other("TLS is off"))?;
            let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{what} in {uri}"));
            let host = uri.host().ok_or_else(|| invalid("no host"))?.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().ok_or_else(|| invalid("no port"))?;
            let name = ServerName::try_from(host.to_string()).map_err(|_| invalid("an invalid server name"))?;
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(client).connect(name, tcp).await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// The DNS names of a verified peer's leaf certificate: its identity.
pub fn certificate_names(leaf: &CertificateDer<'_>) -> Vec<String> {
    webpki::EndEntityCert::try_from(leaf)
        .map(|certificate| certificate.valid_dns_names().map(str::to_string).collect())
        .unwrap_or_default()
}
