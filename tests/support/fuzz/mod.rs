//! Fuzz targets on stable Rust. Each case is a byte string (from the run's seeded RNG, or
//! a saved regression input) turned into an input by `generate.rs`; every target checks a
//! property, not only the absence of a panic:
//!
//! - the request handlers, through the real servers of an in-process cluster: a valid
//!   request is answered well-formed, an invalid one with a clean status (INVALID_ARGUMENT,
//!   NOT_FOUND or FAILED_PRECONDITION); anything else — a transport error from a handler
//!   that panicked, INTERNAL, UNKNOWN, a timeout — is a crash;
//! - the wire: raw protobuf bytes to the orchestrator's methods, and malformed HTTP/2
//!   frames on raw connections; the orchestrator must keep serving;
//! - the bundle reader: a truncated or changed file is refused before it is mapped; a
//!   file whose manifest entry was rewritten to match is parsed without a panic;
//! - the configuration and rules loaders: any text is loaded or refused, never a panic.
//!
//! `recsys-fuzz` (`make fuzz`) runs them at volume and writes `target/reports/fuzz.json`;
//! `tests/fuzz.rs` runs a few hundred cases of each and replays `tests/fuzz-regressions/`.

pub mod generate;
pub mod run;

use std::{
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    time::Duration,
};

use arbitrary::Unstructured;
use bytes::{Buf, BufMut, Bytes};
use recsys_proto::v1::{
    catalog_admin_client::CatalogAdminClient, catalog_service_client::CatalogServiceClient,
    feature_service_client::FeatureServiceClient, rank_service_client::RankServiceClient,
    recall_service_client::RecallServiceClient, recommender_client::RecommenderClient,
    rerank_service_client::RerankServiceClient, AppendEventsRequest, CatalogChangesRequest, RetireItemsRequest,
};
use sha2::Digest;
use tokio::io::AsyncWriteExt;
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    Code, Request, Status,
};

use crate::{Cluster, Service};

use self::generate::Rng;

/// A call that takes longer is a hang: a crash.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What a case did. A crash is the `Err` of [`run_case`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    Refused,
}

pub type CaseResult = Result<Verdict, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Recommend,
    LogEvents,
    Recall,
    Rank,
    Rerank,
    Feature,
    Catalog,
    WireProtobuf,
    WireHttp2,
    BundleReader,
    ConfigLoader,
}

impl Target {
    pub const ALL: [Target; 11] = [
        Target::Recommend,
        Target::LogEvents,
        Target::Recall,
        Target::Rank,
        Target::Rerank,
        Target::Feature,
        Target::Catalog,
        Target::WireProtobuf,
        Target::WireHttp2,
        Target::BundleReader,
        Target::ConfigLoader,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Recommend => "orchestrator.recommend",
            Target::LogEvents => "orchestrator.log_events",
            Target::Recall => "recall.recall",
            Target::Rank => "rank.rank",
            Target::Rerank => "rerank.rerank",
            Target::Feature => "feature.requests",
            Target::Catalog => "feature.catalog",
            Target::WireProtobuf => "wire.protobuf",
            Target::WireHttp2 => "wire.http2_frames",
            Target::BundleReader => "bundle.reader",
            Target::ConfigLoader => "config.loader",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|target| target.name() == name)
    }
}

/// Everything the targets run against: a plaintext cluster, scratch space for files, and
/// the seeds the file targets mutate.
pub struct Fuzzer {
    pub cluster: Cluster,
    scratch: tempfile::TempDir,
    manifest: Vec<u8>,
    signals: Vec<u8>,
    configs: Vec<(ConfigKind, Vec<u8>)>,
}

#[derive(Debug, Clone, Copy)]
enum ConfigKind {
    Orchestrator,
    Feature,
    Recall,
    Rank,
    Rerank,
    Rules,
}

/// The per-worker state of the HTTP/2 frame target: one raw connection, reused until the
/// server closes it.
#[derive(Default)]
pub struct Worker {
    pub index: usize,
    connection: Option<tokio::net::TcpStream>,
}

impl Worker {
    pub fn new(index: usize) -> Self {
        Self { index, connection: None }
    }
}

impl Fuzzer {
    pub async fn start() -> anyhow::Result<Self> {
        let cluster = Cluster::start().await?;
        let root = crate::workspace_root();
        let bundle = cluster.bundle().to_path_buf();
        let configs = [
            (ConfigKind::Orchestrator, "deploy/config/orchestrator.toml"),
            (ConfigKind::Feature, "deploy/config/feature-svc.toml"),
            (ConfigKind::Recall, "deploy/config/recall-svc.toml"),
            (ConfigKind::Rank, "deploy/config/rank-svc.toml"),
            (ConfigKind::Rerank, "deploy/config/rerank-svc.toml"),
            (ConfigKind::Rules, "deploy/rerank/rules.toml"),
        ]
        .into_iter()
        .map(|(kind, path)| Ok((kind, std::fs::read(root.join(path))?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
        // Scratch files live in memory when /dev/shm exists: the file targets write two
        // files per case.
        let shm = Path::new("/dev/shm");
        let scratch = if shm.is_dir() { tempfile::tempdir_in(shm)? } else { tempfile::tempdir()? };
        Ok(Self {
            cluster,
            scratch,
            manifest: std::fs::read(bundle.join("manifest.json"))?,
            signals: std::fs::read(bundle.join(recsys_bundle::ITEM_SIGNALS_FILE))?,
            configs,
        })
    }

    /// One case of `target` from `input`: the verdict, or what went wrong (a crash).
    pub async fn run_case(&self, target: Target, input: &[u8], worker: &mut Worker) -> CaseResult {
        let mut u = Unstructured::new(input);
        let cluster = &self.cluster;
        match target {
            Target::Recommend => {
                let Ok(request) = generate::recommend(&mut u) else { return Ok(Verdict::Refused) };
                let (top_k, excluded) = (request.top_k as usize, request.exclude_item_ids.clone());
                let mut client = RecommenderClient::new(cluster.channel(Service::Orchestrator));
                judge(client.recommend(with_timeout(request, CALL_TIMEOUT)).await, |response| {
                    let items = &response.items;
                    if items.len() > top_k {
                        return Err(format!("{} items for top_k {top_k}", items.len()));
                    }
                    match items.iter().find(|item| excluded.contains(&item.item_id)) {
                        Some(item) => Err(format!("excluded item {:?} served", item.item_id)),
                        None => Ok(()),
                    }
                })
            }
            Target::LogEvents => {
                let Ok(request) = generate::log_events(&mut u) else { return Ok(Verdict::Refused) };
                let sent = request.events.len();
                let mut client = RecommenderClient::new(cluster.channel(Service::Orchestrator));
                judge(client.log_events(with_timeout(request, CALL_TIMEOUT)).await, |response| {
                    let answered = response.accepted as usize + response.rejected.len();
                    // Duplicates are acknowledged among the accepted.
                    if answered != sent {
                        return Err(format!("{sent} events, {answered} accepted or rejected"));
                    }
                    Ok(())
                })
            }
            Target::Recall => {
                let Ok(request) = generate::recall(&mut u) else { return Ok(Verdict::Refused) };
                let mut client = RecallServiceClient::new(cluster.channel(Service::Recall));
                judge(client.recall(with_timeout(request, CALL_TIMEOUT)).await, |_| Ok(()))
            }
            Target::Rank => {
                let Ok(request) = generate::rank(&mut u) else { return Ok(Verdict::Refused) };
                let offered = request.candidates.as_ref().map_or(0, |candidates| candidates.len());
                let mut client = RankServiceClient::new(cluster.channel(Service::Rank));
                judge(client.rank(with_timeout(request, CALL_TIMEOUT)).await, |response| {
                    match response.items.len() <= offered {
                        true => Ok(()),
                        false => Err(format!("{} ranked items from {offered} candidates", response.items.len())),
                    }
                })
            }
            Target::Rerank => {
                let Ok(request) = generate::rerank(&mut u) else { return Ok(Verdict::Refused) };
                let top_k = request.top_k as usize;
                let mut client = RerankServiceClient::new(cluster.channel(Service::Rerank));
                judge(client.rerank(with_timeout(request, CALL_TIMEOUT)).await, |response| {
                    match response.items.len() <= top_k {
                        true => Ok(()),
                        false => Err(format!("{} items for top_k {top_k}", response.items.len())),
                    }
                })
            }
            Target::Feature => {
                let mut client = FeatureServiceClient::new(cluster.channel(Service::Feature));
                match u.int_in_range(0..=2u8).unwrap_or(0) {
                    0 => {
                        let Ok(request) = generate::user_features(&mut u) else { return Ok(Verdict::Refused) };
                        judge(client.get_user_features(with_timeout(request, CALL_TIMEOUT)).await, |_| Ok(()))
                    }
                    1 => {
                        let Ok(request) = generate::item_features(&mut u) else { return Ok(Verdict::Refused) };
                        let asked = request.item_ids.len();
                        judge(client.get_item_features(with_timeout(request, CALL_TIMEOUT)).await, |response| {
                            match response.items.len() == asked {
                                true => Ok(()),
                                false => Err(format!("{} answers for {asked} items", response.items.len())),
                            }
                        })
                    }
                    _ => {
                        let Ok(request) = generate::log_events(&mut u) else { return Ok(Verdict::Refused) };
                        let request = AppendEventsRequest { events: request.events };
                        judge(client.append_events(with_timeout(request, CALL_TIMEOUT)).await, |_| Ok(()))
                    }
                }
            }
            Target::Catalog => match u.int_in_range(0..=2u8).unwrap_or(0) {
                0 => {
                    let Ok(request) = generate::upsert_items(&mut u) else { return Ok(Verdict::Refused) };
                    let mut client = CatalogAdminClient::with_interceptor(
                        cluster.admin_channel(Service::Feature),
                        cluster.operator(),
                    );
                    judge(client.upsert_items(with_timeout(request, CALL_TIMEOUT)).await, |_| Ok(()))
                }
                1 => {
                    let ids: Vec<String> = u.arbitrary().unwrap_or_default();
                    let request =
                        RetireItemsRequest { item_ids: ids.into_iter().map(|id| format!("fuzz-{id}")).collect() };
                    let mut client = CatalogAdminClient::with_interceptor(
                        cluster.admin_channel(Service::Feature),
                        cluster.operator(),
                    );
                    judge(client.retire_items(with_timeout(request, CALL_TIMEOUT)).await, |_| Ok(()))
                }
                _ => {
                    let request = CatalogChangesRequest {
                        since_revision: u.arbitrary().unwrap_or_default(),
                        limit: u.arbitrary().unwrap_or_default(),
                    };
                    let mut client = CatalogServiceClient::new(cluster.channel(Service::Feature));
                    judge(client.catalog_changes(with_timeout(request, CALL_TIMEOUT)).await, |_| Ok(()))
                }
            },
            Target::WireProtobuf => self.wire_protobuf(input).await,
            Target::WireHttp2 => self.wire_http2(input, worker).await,
            Target::BundleReader => {
                let dir = self.scratch.path().join(format!("bundle-{}", worker.index));
                caught(|| self.bundle_case(input, &dir))
            }
            Target::ConfigLoader => {
                let path = self.scratch.path().join(format!("config-{}.toml", worker.index));
                caught(|| self.config_case(input, &path))
            }
        }
    }

    /// Bytes as the request message of one of the orchestrator's methods, framed as gRPC
    /// by tonic, never through our encoder: raw bytes, or a generated request's encoding
    /// with a few bytes changed (mostly still protobuf, so the decoder's edge cases run).
    async fn wire_protobuf(&self, input: &[u8]) -> CaseResult {
        let selector = input.first().copied().unwrap_or(0);
        let method =
            if selector % 2 == 0 { "/recsys.v1.Recommender/Recommend" } else { "/recsys.v1.Recommender/LogEvents" };
        let rest = input.get(1..).unwrap_or_default();
        let body = if selector % 4 < 2 {
            rest.to_vec()
        } else {
            let mut u = Unstructured::new(rest);
            let encoded = match method {
                "/recsys.v1.Recommender/Recommend" => {
                    generate::recommend(&mut u).map(|m| prost::Message::encode_to_vec(&m))
                }
                _ => generate::log_events(&mut u).map(|m| prost::Message::encode_to_vec(&m)),
            };
            generate::mutate(&encoded.unwrap_or_default(), &mut Rng(seed_of(input)))
        };
        let mut grpc = tonic::client::Grpc::new(self.cluster.channel(Service::Orchestrator));
        if let Err(error) = grpc.ready().await {
            return Err(format!("channel not ready: {error}"));
        }
        let path = method.parse().expect("static path");
        let request = with_timeout(Bytes::from(body), Duration::from_secs(10));
        judge(grpc.unary(request, path, RawCodec).await, |_| Ok(()))
    }

    /// Malformed HTTP/2 frames on a raw connection to the orchestrator; every 256th case
    /// (and the caller's final check) proves it still serves.
    async fn wire_http2(&self, input: &[u8], worker: &mut Worker) -> CaseResult {
        let address = self.cluster.address(Service::Orchestrator);
        if worker.connection.is_none() {
            let mut stream =
                tokio::net::TcpStream::connect(address).await.map_err(|error| format!("connect: {error}"))?;
            // The client preface, then an empty SETTINGS frame.
            let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await;
            worker.connection = Some(stream);
        }
        let frames = http2_frames(input);
        let stream = worker.connection.as_mut().expect("connected above");
        let written = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&frames)).await;
        // The server's answer (SETTINGS, GOAWAY, RST_STREAM…) is read and dropped, so its
        // writes never block on a full socket buffer; end of stream means it closed the
        // connection — what a protocol error deserves — and the next case opens another.
        let mut closed = !matches!(written, Ok(Ok(())));
        let _ = tokio::time::timeout(Duration::from_millis(1), stream.readable()).await;
        let mut sink = [0u8; 16 * 1024];
        loop {
            match stream.try_read(&mut sink) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(_) => {}
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed {
            worker.connection = None;
        }
        if input.first().is_some_and(|byte| *byte == 0) {
            self.still_serving().await?;
        }
        Ok(Verdict::Refused)
    }

    /// The orchestrator answers an ordinary request.
    pub async fn still_serving(&self) -> Result<(), String> {
        let request = recsys_proto::v1::RecommendRequest { user_id: "196".into(), top_k: 5, ..Default::default() };
        let mut client = RecommenderClient::new(self.cluster.channel(Service::Orchestrator));
        match client.recommend(with_timeout(request, Duration::from_secs(10))).await {
            Ok(response) if response.get_ref().items.len() == 5 => Ok(()),
            Ok(response) => Err(format!("an ordinary request got {} items", response.get_ref().items.len())),
            Err(status) => Err(format!("the orchestrator stopped serving: {status:?}")),
        }
    }

    fn bundle_case(&self, input: &[u8], dir: &Path) -> CaseResult {
        let mut rng = Rng(seed_of(input));
        let mode = input.first().copied().unwrap_or(0) % 4;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|error| format!("scratch: {error}"))?;
        let (manifest, signals, must_refuse) = match mode {
            // A changed or truncated file under the published manifest: must be refused.
            0 => {
                let signals = generate::mutate(&self.signals, &mut rng);
                let changed = signals != self.signals;
                (self.manifest.clone(), signals, changed)
            }
            1 => {
                let cut = rng.below(self.signals.len());
                (self.manifest.clone(), self.signals[..cut].to_vec(), true)
            }
            // A changed file whose manifest entry was rewritten to match: parsed, not trusted.
            2 => {
                let signals = generate::mutate(&self.signals, &mut rng);
                (self.manifest_listing(&signals)?, signals, false)
            }
            // A mangled manifest.
            _ => (generate::mutate(&self.manifest, &mut rng), self.signals.clone(), false),
        };
        let write =
            |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).map_err(|e| format!("scratch: {e}"));
        write("manifest.json", &manifest)?;
        write(recsys_bundle::ITEM_SIGNALS_FILE, &signals)?;
        let loaded = recsys_bundle::read_manifest(dir).and_then(|manifest| {
            let popularity = recsys_bundle::read_popularity(dir, &manifest)?;
            // Reading every value proves the mapped column is whole.
            Ok(popularity.as_slice().iter().filter(|value| value.is_finite()).count())
        });
        match (loaded, must_refuse) {
            (Ok(_), true) => Err(format!("mode {mode}: a file that does not match the manifest was accepted")),
            (Ok(_), false) => Ok(Verdict::Accepted),
            (Err(_), _) => Ok(Verdict::Refused),
        }
    }

    /// The published manifest with the signals file's entry describing `signals`.
    fn manifest_listing(&self, signals: &[u8]) -> Result<Vec<u8>, String> {
        let mut manifest: serde_json::Value = serde_json::from_slice(&self.manifest).map_err(|e| e.to_string())?;
        manifest["files"][recsys_bundle::ITEM_SIGNALS_FILE] = serde_json::json!({
            "bytes": signals.len(),
            "sha256": format!("{:x}", sha2::Sha256::digest(signals)),
        });
        serde_json::to_vec(&manifest).map_err(|e| e.to_string())
    }

    fn config_case(&self, input: &[u8], path: &Path) -> CaseResult {
        let mut rng = Rng(seed_of(input));
        let (kind, seed) = &self.configs[input.first().copied().unwrap_or(0) as usize % self.configs.len()];
        let text = generate::mutate(seed, &mut rng);
        std::fs::write(path, &text).map_err(|error| format!("scratch: {error}"))?;
        let prefix = "RECSYS_FUZZ_UNSET";
        let loaded = match kind {
            ConfigKind::Orchestrator => load::<orchestrator::Config>(path, prefix),
            ConfigKind::Feature => load::<feature_svc::Config>(path, prefix),
            ConfigKind::Recall => load::<recall_svc::Config>(path, prefix),
            ConfigKind::Rank => load::<rank_svc::Config>(path, prefix),
            ConfigKind::Rerank => load::<rerank_svc::Config>(path, prefix),
            ConfigKind::Rules => {
                String::from_utf8(text).ok().map(|text| rerank_svc::RuleSet::parse(&text).is_ok()).unwrap_or(false)
            }
        };
        Ok(if loaded { Verdict::Accepted } else { Verdict::Refused })
    }
}

fn load<T: serde::Serialize + serde::de::DeserializeOwned + Default>(path: &Path, prefix: &str) -> bool {
    recsys_runtime::load_config::<T>(Some(path), prefix).is_ok()
}

/// A panic inside `case` is a crash, reported with its message.
fn caught(case: impl FnOnce() -> CaseResult) -> CaseResult {
    std::panic::catch_unwind(AssertUnwindSafe(case)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(format!("panicked: {message}"))
    })
}

fn seed_of(input: &[u8]) -> u64 {
    let digest = sha2::Sha256::digest(input);
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

fn with_timeout<T>(message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    request
}

/// A clean answer (OK and well-formed, or a status naming the caller's mistake) or a crash.
fn judge<T>(result: Result<tonic::Response<T>, Status>, check: impl FnOnce(&T) -> Result<(), String>) -> CaseResult {
    match result {
        Ok(response) => check(response.get_ref()).map(|()| Verdict::Accepted),
        Err(status)
            if matches!(status.code(), Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition)
                && !status.message().is_empty() =>
        {
            Ok(Verdict::Refused)
        }
        Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
    }
}

/// One to four HTTP/2 frames from the input: random types, flags and stream ids, with a
/// length field that usually matches the payload and sometimes lies.
fn http2_frames(input: &[u8]) -> Vec<u8> {
    let mut input = input;
    let mut frames = Vec::new();
    let count = 1 + input.first().map_or(0, |byte| byte % 4) as usize;
    for _ in 0..count {
        if input.len() < 6 {
            break;
        }
        let kind = input.get_u8() % 11;
        let flags = input.get_u8();
        let stream = input.get_u32() & 0x7fff_ffff;
        let payload_len = input.len().min(input.first().map_or(0, |byte| *byte as usize * 4));
        let payload = &input[..payload_len];
        let declared = if flags & 0x40 != 0 { (stream as usize ^ payload_len) & 0x00ff_ffff } else { payload_len };
        frames.put_uint(declared as u64, 3);
        frames.put_u8(kind);
        frames.put_u8(flags);
        frames.put_u32(stream % 16);
        frames.put_slice(payload);
        input = &input[payload_len..];
    }
    frames
}

/// Bytes in, bytes out: requests that never went through prost's encoder.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, buffer: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buffer.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, buffer: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(buffer.copy_to_bytes(buffer.remaining())))
    }
}

/// Where a crash's input is kept, and where `tests/fuzz.rs` finds the saved ones.
pub fn regression_dir() -> PathBuf {
    crate::workspace_root().join("tests/fuzz-regressions")
}

/// Connection abuse: holds `connections` idle or slow connections to the orchestrator —
/// half never send a byte, half stop in the middle of the HTTP/2 preface — while a client
/// sends `requests` ordinary requests, two at a time, each with `deadline`. Returns the
/// share answered in full within the deadline.
pub async fn served_during_idle_flood(
    cluster: &Cluster,
    connections: usize,
    requests: usize,
    deadline: Duration,
) -> anyhow::Result<f64> {
    let address = cluster.address(Service::Orchestrator);
    let mut held = Vec::with_capacity(connections);
    for n in 0..connections {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        if n % 2 == 1 {
            stream.write_all(b"PRI * HTTP/2.0\r\n").await?;
        }
        held.push(stream);
    }
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for client in 0..2 {
        let channel = cluster.channel(Service::Orchestrator);
        let served = std::sync::Arc::clone(&served);
        clients.push(tokio::spawn(async move {
            let mut recommender = RecommenderClient::new(channel);
            for n in (client..requests).step_by(2) {
                let request = recsys_proto::v1::RecommendRequest {
                    user_id: (1 + n % 900).to_string(),
                    top_k: 10,
                    ..Default::default()
                };
                let answered = tokio::time::timeout(deadline, recommender.recommend(with_timeout(request, deadline)));
                if let Ok(Ok(response)) = answered.await {
                    if response.get_ref().items.len() == 10 {
                        served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for client in clients {
        client.await?;
    }
    drop(held);
    Ok(served.load(std::sync::atomic::Ordering::Relaxed) as f64 / requests.max(1) as f64)
}
