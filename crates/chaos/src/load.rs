//! Load generation against the orchestrator: open loop (requests start on a fixed
//! schedule whether or not earlier ones finished, as real traffic does) and closed loop
//! (a fixed number of workers back to back, to find the sustainable throughput).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use recsys_proto::v1::{recommender_client::RecommenderClient, RecommendRequest};
use tokio::{sync::mpsc, task::JoinHandle};
use tonic::{transport::Channel, Code};

#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Ok {
        degraded: bool,
    },
    /// RESOURCE_EXHAUSTED or UNAVAILABLE from load shedding.
    Shed,
    DeadlineExceeded,
    Failed(Code),
}

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Since the phase's start.
    pub started: Duration,
    pub latency: Duration,
    pub outcome: Outcome,
}

/// Connections the generator spreads requests over, as a gateway's pool would (one
/// HTTP/2 connection would serialise every frame through one connection task).
const CONNECTIONS: usize = 4;

fn channel(target: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{target}"))
        .expect("valid address")
        .tcp_nodelay(true)
        .connect_lazy()
}

fn client_pool(target: SocketAddr) -> Vec<RecommenderClient<Channel>> {
    (0..CONNECTIONS).map(|_| RecommenderClient::new(channel(target))).collect()
}

/// Whose recommendations the generator asks for.
#[derive(Debug, Clone)]
pub enum Users {
    /// MovieLens-100k's 943 users in turn, every tenth request an unknown user.
    MovieLens,
    /// Drawn uniformly from a population (the synthetic set's users), by request number.
    Drawn(Arc<Vec<String>>),
}

impl Users {
    pub fn user(&self, sequence: u64) -> String {
        match self {
            Users::MovieLens if sequence.is_multiple_of(10) => format!("chaos-new-{sequence}"),
            Users::MovieLens => (1 + sequence % 943).to_string(),
            Users::Drawn(users) => users[crate::Rng(sequence).below(users.len())].clone(),
        }
    }
}

/// One request (top 10) for the request numbered `sequence`.
async fn one_request(
    client: &mut RecommenderClient<Channel>,
    users: &Users,
    sequence: u64,
    deadline: Duration,
) -> (Duration, Outcome) {
    let user_id = users.user(sequence);
    let mut request = tonic::Request::new(RecommendRequest { user_id, top_k: 10, ..RecommendRequest::default() });
    request.set_timeout(deadline);
    let started = Instant::now();
    // The client gives up a little after the deadline, so a hung call is still counted.
    let result = tokio::time::timeout(deadline + Duration::from_millis(200), client.recommend(request)).await;
    let latency = started.elapsed();
    let outcome = match result {
        Ok(Ok(response)) => Outcome::Ok { degraded: !response.into_inner().degraded_stages.is_empty() },
        Ok(Err(status)) => match status.code() {
            Code::ResourceExhausted => Outcome::Shed,
            Code::DeadlineExceeded | Code::Cancelled => Outcome::DeadlineExceeded,
            code => Outcome::Failed(code),
        },
        Err(_) => Outcome::DeadlineExceeded,
    };
    (latency, outcome)
}

pub struct OpenLoop {
    stop: Arc<AtomicBool>,
    driver: JoinHandle<()>,
    samples: mpsc::UnboundedReceiver<Sample>,
}

impl OpenLoop {
    pub fn start(target: SocketAddr, rate: f64, deadline: Duration, t0: Instant, users: Users) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (sender, samples) = mpsc::unbounded_channel();
        let clients = client_pool(target);
        let stop_flag = Arc::clone(&stop);
        let sequence = Arc::new(AtomicU64::new(0));
        let driver = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1.0)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut in_flight = Vec::new();
            while !stop_flag.load(Ordering::Relaxed) {
                ticker.tick().await;
                let n = sequence.fetch_add(1, Ordering::Relaxed);
                let mut client = clients[n as usize % CONNECTIONS].clone();
                let sender = sender.clone();
                let users = users.clone();
                in_flight.push(tokio::spawn(async move {
                    let started = t0.elapsed();
                    let (latency, outcome) = one_request(&mut client, &users, n, deadline).await;
                    let _ = sender.send(Sample { started, latency, outcome });
                }));
                in_flight.retain(|task: &JoinHandle<()>| !task.is_finished());
            }
            for task in in_flight {
                let _ = task.await;
            }
        });
        Self { stop, driver, samples }
    }

    pub async fn stop(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.driver.await;
        let mut samples = Vec::new();
        while let Ok(sample) = self.samples.try_recv() {
            samples.push(sample);
        }
        samples.sort_by_key(|s| s.started);
        samples
    }
}

/// `requests` requests from one client, back to back on one connection, numbered from
/// `first`: each one's latency and outcome.
pub async fn closed_loop(
    target: SocketAddr,
    first: u64,
    requests: usize,
    deadline: Duration,
    users: &Users,
) -> Vec<(Duration, Outcome)> {
    let mut client = RecommenderClient::new(channel(target));
    let mut samples = Vec::with_capacity(requests);
    for n in first..first + requests as u64 {
        samples.push(one_request(&mut client, users, n, deadline).await);
    }
    samples
}

/// Requests per second completed successfully by `workers` back-to-back clients.
pub async fn closed_loop_throughput(
    target: SocketAddr,
    workers: usize,
    deadline: Duration,
    duration: Duration,
    users: Users,
) -> f64 {
    let completed = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + duration;
    let tasks: Vec<_> = (0..workers)
        .map(|worker| {
            let completed = Arc::clone(&completed);
            let mut client = RecommenderClient::new(channel(target));
            let users = users.clone();
            tokio::spawn(async move {
                let mut n = worker as u64 * 1_000_003;
                while Instant::now() < end {
                    n += 1;
                    if let (_, Outcome::Ok { .. }) = one_request(&mut client, &users, n, deadline).await {
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    completed.load(Ordering::Relaxed) as f64 / duration.as_secs_f64()
}

pub fn quantile_ms(latencies: impl Iterator<Item = Duration>, quantile: f64) -> f64 {
    let mut histogram = hdrhistogram::Histogram::<u64>::new(3).expect("valid precision");
    for latency in latencies {
        let _ = histogram.record(latency.as_micros().max(1) as u64);
    }
    if histogram.is_empty() {
        return 0.0;
    }
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}
