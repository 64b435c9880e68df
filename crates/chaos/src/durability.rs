//! The "nothing acknowledged is lost" check shared by `recsys-durability` and
//! `bench-features`: clients append event batches while feature-svc is killed, recording
//! only the batches it acknowledged; afterwards every one of them is read back. Each batch
//! belongs to a user of its own, so a batch whose acknowledgement was lost in a kill
//! (stored or not) can never hide a missing one.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use recsys_proto::v1::{
    feature_service_client::FeatureServiceClient, AppendEventsRequest, Event, EventType, GetUserFeaturesRequest,
};
use tokio::task::JoinHandle;

/// The acknowledged batches: (user id, item ids).
type Acknowledged = Arc<Mutex<Vec<(String, Vec<String>)>>>;

/// Appending clients, running until [`Writers::stop`].
pub struct Writers {
    acknowledged: Acknowledged,
    stop: Arc<AtomicBool>,
    clients: Vec<JoinHandle<()>>,
}

impl Writers {
    /// `clients` clients appending batches of `size` click events to `address`, for users
    /// `<tag>-<client>-<batch>`. Events carry ids, so a retried batch is not counted twice.
    pub fn start(address: SocketAddr, tag: &str, clients: usize, size: usize) -> Self {
        let acknowledged: Acknowledged = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|client| {
                let tag = format!("{tag}-{client}");
                tokio::spawn(append_until(address, tag, size, Arc::clone(&acknowledged), Arc::clone(&stop)))
            })
            .collect();
        Self { acknowledged, stop, clients }
    }

    /// Stops the clients and returns the batches feature-svc acknowledged.
    pub async fn stop(self) -> anyhow::Result<Vec<(String, Vec<String>)>> {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.await?;
        }
        Ok(std::mem::take(&mut *self.acknowledged.lock().expect("not poisoned")))
    }
}

/// The next delay before a kill: a fixed sequence from 137 ms, so runs are comparable
/// while kills land at varied moments (100–700 ms).
pub fn next_kill_delay_ms(previous: u64) -> u64 {
    (previous * 7 + 101) % 600 + 100
}

async fn append_until(
    address: SocketAddr,
    tag: String,
    size: usize,
    acknowledged: Acknowledged,
    stop: Arc<AtomicBool>,
) {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .expect("a valid address")
        .connect_timeout(Duration::from_millis(100));
    let channel = endpoint.connect_lazy();
    let mut number = 0;
    while !stop.load(Ordering::Relaxed) {
        number += 1;
        let user = format!("{tag}-{number}");
        let items: Vec<String> = (0..size).map(|n| format!("item-{n}")).collect();
        let events = items
            .iter()
            .enumerate()
            .map(|(n, item)| Event {
                user_id: user.clone(),
                item_id: item.clone(),
                r#type: EventType::Click as i32,
                timestamp_ms: 1_700_000_000_000 + n as i64,
                event_id: format!("{user}-{n}"),
                ..Event::default()
            })
            .collect();
        let mut request = tonic::Request::new(AppendEventsRequest { events });
        request.set_timeout(Duration::from_secs(5));
        match FeatureServiceClient::new(channel.clone()).append_events(request).await {
            Ok(_) => acknowledged.lock().expect("not poisoned").push((user, items)),
            // Down or killed mid-call: the batch's fate is unknown, so it is not counted.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Reads every acknowledged batch back from feature-svc at `address`; returns
/// (acknowledged events, lost events), naming the first losses on stderr.
pub async fn count_lost(address: SocketAddr, batches: &[(String, Vec<String>)]) -> anyhow::Result<(usize, usize)> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?.connect().await?;
    let mut reader = FeatureServiceClient::new(channel);
    let (mut total, mut lost) = (0, 0);
    for (user, items) in batches {
        total += items.len();
        let features = reader
            .get_user_features(GetUserFeaturesRequest { user_id: user.clone(), max_history: 0, as_of_ms: 0 })
            .await?
            .into_inner();
        let stored: HashSet<&String> = features.history_item_ids.iter().collect();
        let missing = items.iter().filter(|item| !stored.contains(item)).count();
        let missing = missing.max(items.len().saturating_sub(features.event_count as usize));
        if missing > 0 && lost < 500 {
            eprintln!("    lost: {user} has {} of {} events", features.event_count, items.len());
        }
        lost += missing;
    }
    Ok((total, lost))
}
