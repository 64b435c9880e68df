//! Runs the channels of one recall request at once, off the async workers. Each channel
//! has its own time budget: one that has not answered by then is left out of this answer
//! (and counted), not waited for, so a slow channel costs its share of the answer, never
//! the request's deadline. Its work finishes on the blocking pool and is discarded.

use std::time::Duration;

use tokio::task::JoinHandle;

use crate::Channel;

static CHANNEL_DROPPED: std::sync::LazyLock<prometheus::IntCounterVec> = std::sync::LazyLock::new(|| {
    prometheus::register_int_counter_vec!(
        "recsys_recall_channel_dropped_total",
        "Recall channels left out of an answer, by channel and reason (budget, failed)",
        &["channel", "reason"]
    )
    .expect("metric registers once")
});

/// One channel's work for one request.
pub struct ChannelJob {
    pub channel: Channel,
    pub budget: Duration,
    pub propose: Box<dyn FnOnce() -> Vec<usize> + Send>,
}

/// Every job's proposals that arrived within its budget, in the jobs' order.
pub async fn propose_concurrently(jobs: Vec<ChannelJob>) -> Vec<(Channel, Vec<usize>)> {
    let started: Vec<(Channel, Duration, JoinHandle<Vec<usize>>)> = jobs
        .into_iter()
        .map(|job| {
            let span = tracing::info_span!("recall_channel", channel = job.channel.name());
            let propose = job.propose;
            (job.channel, job.budget, tokio::task::spawn_blocking(move || span.in_scope(propose)))
        })
        .collect();
    let answers = started.into_iter().map(|(channel, budget, task)| async move {
        match tokio::time::timeout(budget, task).await {
            Ok(Ok(items)) => Some((channel, items)),
            Ok(Err(error)) => {
                tracing::error!(channel = channel.name(), %error, "recall channel failed");
                CHANNEL_DROPPED.with_label_values(&[channel.name(), "failed"]).inc();
                None
            }
            Err(_) => {
                tracing::debug!(channel = channel.name(), budget_ms = budget.as_millis() as u64, "channel over budget");
                CHANNEL_DROPPED.with_label_values(&[channel.name(), "budget"]).inc();
                None
            }
        }
    });
    futures::future::join_all(answers).await.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn job(channel: Channel, budget_ms: u64, work_ms: u64, items: Vec<usize>) -> ChannelJob {
        ChannelJob {
            channel,
            budget: Duration::from_millis(budget_ms),
            propose: Box::new(move || {
                std::thread::sleep(Duration::from_millis(work_ms));
                items
            }),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn channels_run_at_once_and_one_over_budget_is_dropped_not_awaited() {
        let started = Instant::now();
        let answers = propose_concurrently(vec![
            job(Channel::Embedding, 3_000, 400, vec![1, 2]),
            job(Channel::ItemCf, 3_000, 400, vec![3]),
            job(Channel::Popular, 100, 1_500, vec![4]),
        ])
        .await;
        let elapsed = started.elapsed();
        assert_eq!(answers, vec![(Channel::Embedding, vec![1, 2]), (Channel::ItemCf, vec![3])]);
        // One after the other, the two kept channels alone would take 800 ms, and waiting
        // for the slow one 1.5 s more.
        assert!(elapsed < Duration::from_millis(750), "{elapsed:?}");
        let dropped = CHANNEL_DROPPED.with_label_values(&["popular", "budget"]).get();
        assert!(dropped >= 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_channel_that_panics_is_left_out() {
        let panicking = ChannelJob {
            channel: Channel::Realtime,
            budget: Duration::from_secs(5),
            propose: Box::new(|| panic!("bug")),
        };
        let answers = propose_concurrently(vec![panicking, job(Channel::ColdStart, 5_000, 0, vec![9])]).await;
        assert_eq!(answers, vec![(Channel::ColdStart, vec![9])]);
    }
}
