//! Cross-request micro-batching of the fine model. Fine-model rows are independent (each
//! row carries its user's features and behaviour sequence), so the rows of concurrent
//! requests can share one model run: ONNX Runtime's fixed cost per run and per operator
//! is then paid once per batch instead of once per request.
//!
//! Requests queue their rows in a bounded queue (full: `RESOURCE_EXHAUSTED`, never an
//! unbounded backlog). One worker thread per model session takes the first waiting job,
//! then gathers more until the batch holds `max_rows` rows or the first job has waited
//! `max_wait_us` — but it only waits while other requests are still building their inputs
//! and so are about to arrive: a lone request is never held back.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use recsys_bundle::RankerInputs;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::{OnnxModel, RankError, Result};

static BATCH_ROWS: std::sync::LazyLock<prometheus::Histogram> = std::sync::LazyLock::new(|| {
    prometheus::register_histogram!(
        "recsys_rank_micro_batch_rows",
        "Rows per fine-model run when micro-batching is on",
        prometheus::exponential_buckets(16.0, 2.0, 10).expect("valid buckets")
    )
    .expect("metric registers once")
});

static BATCH_REQUESTS: std::sync::LazyLock<prometheus::Histogram> = std::sync::LazyLock::new(|| {
    prometheus::register_histogram!(
        "recsys_rank_micro_batch_requests",
        "Requests sharing one fine-model run when micro-batching is on",
        vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0]
    )
    .expect("metric registers once")
});

/// How waiting requests are grouped into fine-model runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchingConfig {
    pub enabled: bool,
    /// Gathering stops once a run holds this many rows (a larger request runs alone).
    pub max_rows: usize,
    /// The longest the first request of a batch waits for others to join it.
    pub max_wait_us: u64,
    /// Requests waiting for a run; beyond this the service answers RESOURCE_EXHAUSTED.
    pub queue_depth: usize,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self { enabled: false, max_rows: 256, max_wait_us: 300, queue_depth: 256 }
    }
}

struct Job {
    inputs: RankerInputs,
    reply: oneshot::Sender<Result<Vec<f32>>>,
}

/// Requests that are building their fine inputs: the batch collector waits for these.
#[derive(Default)]
struct Arrivals(AtomicUsize);

/// Counts a request as on its way to the queue until it is dropped.
pub struct Arriving(Arc<Arrivals>);

impl Drop for Arriving {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct MicroBatcher {
    queue: SyncSender<Job>,
    arrivals: Arc<Arrivals>,
}

impl MicroBatcher {
    /// Starts `workers` threads running `model` (one per session of the model).
    pub fn start(model: Arc<OnnxModel>, workers: usize, config: &BatchingConfig) -> Self {
        let (queue, receiver) = mpsc::sync_channel(config.queue_depth.max(1));
        let receiver = Arc::new(Mutex::new(receiver));
        let arrivals = Arc::new(Arrivals::default());
        for worker in 0..workers.max(1) {
            let collector = Collector {
                receiver: Arc::clone(&receiver),
                arrivals: Arc::clone(&arrivals),
                max_rows: config.max_rows.max(1),
                max_wait: Duration::from_micros(config.max_wait_us),
            };
            let model = Arc::clone(&model);
            std::thread::Builder::new()
                .name(format!("rank-batch-{worker}"))
                .spawn(move || collector.run(&model))
                .expect("the OS starts a thread");
        }
        Self { queue, arrivals }
    }

    /// Call when a request starts building its fine inputs; hold the guard until `score`.
    pub fn arriving(&self) -> Arriving {
        self.arrivals.0.fetch_add(1, Ordering::AcqRel);
        Arriving(Arc::clone(&self.arrivals))
    }

    /// The fine scores of `inputs`, computed in a shared run.
    pub async fn score(&self, inputs: RankerInputs, arriving: Arriving) -> Result<Vec<f32>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        let sent = self.queue.try_send(Job { inputs, reply });
        drop(arriving);
        match sent {
            Ok(()) => answer.await.map_err(|_| RankError::Onnx("the batch worker stopped".into()))?,
            Err(TrySendError::Full(_)) => Err(RankError::Overloaded("the fine-model batch queue is full".into())),
            Err(TrySendError::Disconnected(_)) => Err(RankError::Onnx("the batch workers stopped".into())),
        }
    }
}

struct Collector {
    receiver: Arc<Mutex<Receiver<Job>>>,
    arrivals: Arc<Arrivals>,
    max_rows: usize,
    max_wait: Duration,
}

/// How long a collector sleeps between checks for more arrivals.
const POLL: Duration = Duration::from_micros(50);

impl Collector {
    fn run(self, model: &OnnxModel) {
        let mut batch = RankerInputs::default();
        let mut jobs: Vec<Job> = Vec::new();
        while self.collect(&mut jobs) {
            batch.clear();
            for job in &jobs {
                batch.extend_from(&job.inputs);
            }
            BATCH_ROWS.observe(batch.len() as f64);
            BATCH_REQUESTS.observe(jobs.len() as f64);
            match model.score(batch.len(), &crate::ranking::fine_feed(&batch)) {
                Ok(scores) => {
                    let mut rest = scores.as_slice();
                    for job in jobs.drain(..) {
                        let (mine, others) = rest.split_at(job.inputs.len());
                        rest = others;
                        let _ = job.reply.send(Ok(mine.to_vec()));
                    }
                }
                Err(error) => {
                    let message = error.to_string();
                    for job in jobs.drain(..) {
                        let _ = job.reply.send(Err(RankError::Onnx(message.clone())));
                    }
                }
            }
        }
    }

    /// Gathers the next batch into `jobs`; false once the service is gone. One worker
    /// collects at a time (it holds the receiver), so batches fill instead of splitting.
    fn collect(&self, jobs: &mut Vec<Job>) -> bool {
        let receiver = self.receiver.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Ok(first) = receiver.recv() else {
            return false;
        };
        let deadline = Instant::now() + self.max_wait;
        let mut rows = first.inputs.len();
        jobs.push(first);
        while rows < self.max_rows {
            let job = match receiver.try_recv() {
                Ok(job) => job,
                Err(_) => {
                    let now = Instant::now();
                    if now >= deadline || self.arrivals.0.load(Ordering::Acquire) == 0 {
                        break;
                    }
                    match receiver.recv_timeout(POLL.min(deadline - now)) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            rows += job.inputs.len();
            jobs.push(job);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_count_requests_until_their_guard_drops() {
        let arrivals = Arc::new(Arrivals::default());
        arrivals.0.fetch_add(2, Ordering::AcqRel);
        let first = Arriving(Arc::clone(&arrivals));
        let second = Arriving(Arc::clone(&arrivals));
        drop(first);
        assert_eq!(arrivals.0.load(Ordering::Acquire), 1);
        drop(second);
        assert_eq!(arrivals.0.load(Ordering::Acquire), 0);
    }
}
