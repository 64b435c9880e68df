//! Following the run-time catalogue: recall-svc and rerank-svc keep every item whose
//! metadata changed since the bundle (stock, promotion, publish time, attributes, retired)
//! in memory, polling feature-svc's `CatalogChanges` from the last revision they saw. A
//! change is visible to the request path one poll interval after it was acknowledged.
//! When feature-svc is unreachable the last known catalogue keeps serving.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use recsys_proto::v1::{
    catalog_service_client::CatalogServiceClient, Availability, CatalogChangesRequest, CatalogItem,
};
use serde::{Deserialize, Serialize};

static CATALOG_REVISION: std::sync::LazyLock<prometheus::IntGauge> = std::sync::LazyLock::new(|| {
    prometheus::register_int_gauge!(
        "recsys_catalog_revision",
        "The run-time catalogue revision this service has applied"
    )
    .expect("metric registers once")
});

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CatalogConfig {
    /// feature-svc's address (`host:port`); empty: no run-time catalogue (bundle only).
    pub feature: String,
    /// How often the change log is polled: the bound on how late a change is applied.
    pub poll_ms: u64,
    /// How long start-up waits to read the whole catalogue before serving anyway (with a
    /// warning: until feature-svc answers, retired items are not known).
    pub startup_wait_ms: u64,
}

impl Default for CatalogConfig {
    fn default() -> Self {
        Self { feature: "127.0.0.1:50052".into(), poll_ms: 250, startup_wait_ms: 30_000 }
    }
}

/// Whether an item may be served at all: not retired, not out of stock.
pub fn servable(item: &CatalogItem) -> bool {
    !item.retired && item.availability != Availability::OutOfStock as i32
}

/// The items changed at run time, by id, and the revision they are complete up to.
#[derive(Debug, Default)]
pub struct Catalog {
    items: RwLock<HashMap<String, Arc<CatalogItem>>>,
    /// The ids of `items` that may not be served, rebuilt when a change touches one, so a
    /// request reads it without walking the catalogue.
    unservable: RwLock<Arc<Vec<String>>>,
    /// Servable records with a publish time, newest first (at most `NEWEST_KEPT`): the
    /// new items recall's cold-start channel can propose before any bundle knows them.
    newest: RwLock<Arc<Vec<Arc<CatalogItem>>>>,
    revision: std::sync::atomic::AtomicU64,
    /// Set once the whole change log has been read (`wait_synced`).
    synced: std::sync::atomic::AtomicBool,
    synced_notify: tokio::sync::Notify,
}

/// How many of the newest records `Catalog::newest` keeps.
const NEWEST_KEPT: usize = 1_000;

impl Catalog {
    /// Starts following feature-svc (when configured) and returns the catalogue it fills.
    pub fn follow(config: &CatalogConfig, tls: &crate::Tls) -> Arc<Self> {
        let catalog = Arc::new(Self::default());
        if config.feature.is_empty() {
            catalog.mark_synced();
        } else {
            match crate::client::lazy_channel(&config.feature, Duration::from_secs(1), tls) {
                Ok(channel) => {
                    let client = CatalogServiceClient::new(channel);
                    tokio::spawn(poll(Arc::clone(&catalog), client, Duration::from_millis(config.poll_ms.max(10))));
                }
                Err(error) => {
                    tracing::error!(feature = %config.feature, %error, "catalogue address is invalid; not following")
                }
            }
        }
        catalog
    }

    /// `follow`, then waits (at most `startup_wait_ms`) until the whole catalogue is read:
    /// what a service calls before it serves.
    pub async fn follow_synced(config: &CatalogConfig, tls: &crate::Tls) -> Arc<Self> {
        let catalog = Self::follow(config, tls);
        if !catalog.wait_synced(Duration::from_millis(config.startup_wait_ms)).await {
            tracing::warn!(
                feature = %config.feature,
                waited_ms = config.startup_wait_ms,
                "serving before the run-time catalogue was read: retired items are not known until it is"
            );
        }
        catalog
    }

    /// An item's run-time record, if it changed since the bundle.
    pub fn get(&self, item_id: &str) -> Option<Arc<CatalogItem>> {
        self.items.read().expect("catalogue lock").get(item_id).cloned()
    }

    /// Looks up many items under one lock.
    pub fn get_many<'a>(&self, item_ids: impl IntoIterator<Item = &'a str>) -> Vec<Option<Arc<CatalogItem>>> {
        let items = self.items.read().expect("catalogue lock");
        item_ids.into_iter().map(|id| items.get(id).cloned()).collect()
    }

    /// Items recall must leave out whatever channel proposes them (retired, out of stock).
    pub fn unservable(&self) -> Arc<Vec<String>> {
        Arc::clone(&self.unservable.read().expect("catalogue lock"))
    }

    /// Servable records with a publish time, newest first.
    pub fn newest(&self) -> Arc<Vec<Arc<CatalogItem>>> {
        Arc::clone(&self.newest.read().expect("catalogue lock"))
    }

    pub fn revision(&self) -> u64 {
        self.revision.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until the follower has read the whole change log once, at most `timeout`;
    /// returns whether it had. A service waits for this before it serves, so a restart does
    /// not serve retired items while the catalogue is still empty.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let synced = || self.synced.load(std::sync::atomic::Ordering::Acquire);
        tokio::time::timeout(timeout, async {
            loop {
                let notified = self.synced_notify.notified();
                if synced() {
                    return;
                }
                notified.await;
            }
        })
        .await
        .is_ok()
    }

    fn mark_synced(&self) {
        if !self.synced.swap(true, std::sync::atomic::Ordering::AcqRel) {
            self.synced_notify.notify_waiters();
        }
    }

    /// Forgets everything: the store was reset (its latest revision is below ours).
    fn reset(&self) {
        self.items.write().expect("catalogue lock").clear();
        *self.unservable.write().expect("catalogue lock") = Arc::default();
        *self.newest.write().expect("catalogue lock") = Arc::default();
        self.revision.store(0, std::sync::atomic::Ordering::Release);
    }

    /// Applies changed records (a later revision replaces an earlier one).
    pub fn apply(&self, changed: Vec<CatalogItem>, revision: u64) {
        {
            let mut items = self.items.write().expect("catalogue lock");
            let mut servability_changed = false;
            let newest_changed = !changed.is_empty();
            for item in changed {
                let was_servable = items.get(&item.item_id).is_none_or(|old| servable(old));
                servability_changed |= was_servable != servable(&item);
                items.insert(item.item_id.clone(), Arc::new(item));
            }
            if servability_changed {
                let ids = items.values().filter(|item| !servable(item)).map(|item| item.item_id.clone()).collect();
                *self.unservable.write().expect("catalogue lock") = Arc::new(ids);
            }
            if newest_changed {
                let mut newest: Vec<Arc<CatalogItem>> =
                    items.values().filter(|item| servable(item) && item.publish_time_ms > 0).cloned().collect();
                let by_time = |a: &Arc<CatalogItem>, b: &Arc<CatalogItem>| {
                    b.publish_time_ms.cmp(&a.publish_time_ms).then_with(|| a.item_id.cmp(&b.item_id))
                };
                if newest.len() > NEWEST_KEPT {
                    newest.select_nth_unstable_by(NEWEST_KEPT, by_time);
                    newest.truncate(NEWEST_KEPT);
                }
                newest.sort_by(by_time);
                *self.newest.write().expect("catalogue lock") = Arc::new(newest);
            }
        }
        self.revision.fetch_max(revision, std::sync::atomic::Ordering::AcqRel);
    }
}

async fn poll(catalog: Arc<Catalog>, mut client: CatalogServiceClient<tonic::transport::Channel>, every: Duration) {
    let mut failing = false;
    loop {
        let mut request = tonic::Request::new(CatalogChangesRequest { since_revision: catalog.revision(), limit: 0 });
        // A feature-svc that stalls mid-answer must not freeze the catalogue silently.
        request.set_timeout(every.max(Duration::from_millis(250)) * 4);
        match client.catalog_changes(request).await {
            Ok(response) => {
                let response = response.into_inner();
                if failing {
                    tracing::info!(revision = response.revision, "catalogue changes reachable again");
                    failing = false;
                }
                if response.head_revision < catalog.revision() {
                    tracing::warn!(
                        head = response.head_revision,
                        followed = catalog.revision(),
                        "the catalogue store was reset; reading it again from the start"
                    );
                    catalog.reset();
                    continue;
                }
                let more = response.more;
                let count = response.items.len();
                catalog.apply(response.items, response.revision);
                CATALOG_REVISION.set(catalog.revision() as i64);
                if count > 0 {
                    tracing::debug!(changed = count, revision = catalog.revision(), "catalogue changes applied");
                }
                if more {
                    continue; // catching up: the next page at once
                }
                catalog.mark_synced();
            }
            Err(status) => {
                // Logged once per outage; the last known catalogue keeps serving.
                if !failing {
                    tracing::warn!(code = ?status.code(), message = status.message(), "catalogue changes unavailable");
                    failing = true;
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_feature_svc_it_counts_as_synced_and_with_it_waits() {
        let none = Catalog::follow(
            &CatalogConfig { feature: String::new(), ..CatalogConfig::default() },
            &crate::Tls::plaintext(),
        );
        assert!(none.wait_synced(Duration::from_millis(10)).await);
        let unreachable = Catalog::follow(
            &CatalogConfig { feature: "127.0.0.1:9".into(), poll_ms: 10, startup_wait_ms: 0 },
            &crate::Tls::plaintext(),
        );
        assert!(!unreachable.wait_synced(Duration::from_millis(100)).await, "never read: not synced");
    }

    #[test]
    fn later_records_replace_earlier_ones_and_servability_follows_them() {
        let catalog = Catalog::default();
        let item = |retired, availability: Availability, revision| CatalogItem {
            item_id: "a".into(),
            retired,
            availability: availability as i32,
            revision,
            ..CatalogItem::default()
        };
        catalog.apply(vec![item(false, Availability::InStock, 1)], 1);
        assert!(servable(&catalog.get("a").unwrap()));
        catalog.apply(vec![item(false, Availability::OutOfStock, 2)], 2);
        assert!(!servable(&catalog.get("a").unwrap()));
        catalog.apply(vec![item(true, Availability::Unspecified, 3)], 3);
        assert!(!servable(&catalog.get("a").unwrap()));
        assert_eq!(catalog.revision(), 3);
        assert_eq!(*catalog.unservable(), ["a"]);
        catalog.apply(vec![item(false, Availability::InStock, 4)], 4);
        assert!(catalog.unservable().is_empty(), "upserted again: servable");
        let published = |id: &str, at: i64, retired| CatalogItem {
            item_id: id.into(),
            publish_time_ms: at,
            retired,
            ..CatalogItem::default()
        };
        catalog.apply(vec![published("old", 1, false), published("new", 9, false), published("gone", 20, true)], 5);
        let newest: Vec<String> = catalog.newest().iter().map(|item| item.item_id.clone()).collect();
        assert_eq!(newest, ["new", "old"], "servable, published, newest first");
        assert_eq!(catalog.get_many(["a", "b"]).iter().map(Option::is_some).collect::<Vec<_>>(), [true, false]);
        catalog.reset();
        assert!(catalog.get("a").is_none() && catalog.newest().is_empty() && catalog.revision() == 0);
    }
}
