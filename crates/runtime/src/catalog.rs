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
}

impl Default for CatalogConfig {
    fn default() -> Self {
        Self { feature: "127.0.0.1:50052".into(), poll_ms: 250 }
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
    revision: std::sync::atomic::AtomicU64,
}

impl Catalog {
    /// Starts following feature-svc (when configured) and returns the catalogue it fills.
    pub fn follow(config: &CatalogConfig) -> Arc<Self> {
        let catalog = Arc::new(Self::default());
        if !config.feature.is_empty() {
            match crate::client::lazy_channel(&config.feature, Duration::from_secs(1)) {
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

    /// An item's run-time record, if it changed since the bundle.
    pub fn get(&self, item_id: &str) -> Option<Arc<CatalogItem>> {
        self.items.read().expect("catalogue lock").get(item_id).cloned()
    }

    /// Looks up many items under one lock.
    pub fn get_many<'a>(&self, item_ids: impl IntoIterator<Item = &'a str>) -> Vec<Option<Arc<CatalogItem>>> {
        let items = self.items.read().expect("catalogue lock");
        item_ids.into_iter().map(|id| items.get(id).cloned()).collect()
    }

    /// Every run-time record (for channels that list new items).
    pub fn all(&self) -> Vec<Arc<CatalogItem>> {
        self.items.read().expect("catalogue lock").values().cloned().collect()
    }

    /// Items recall must leave out whatever channel proposes them (retired, out of stock).
    pub fn unservable(&self) -> Arc<Vec<String>> {
        Arc::clone(&self.unservable.read().expect("catalogue lock"))
    }

    pub fn revision(&self) -> u64 {
        self.revision.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Applies changed records (a later revision replaces an earlier one).
    pub fn apply(&self, changed: Vec<CatalogItem>, revision: u64) {
        {
            let mut items = self.items.write().expect("catalogue lock");
            let mut servability_changed = false;
            for item in changed {
                let was_servable = items.get(&item.item_id).is_none_or(|old| servable(old));
                servability_changed |= was_servable != servable(&item);
                items.insert(item.item_id.clone(), Arc::new(item));
            }
            if servability_changed {
                let ids = items.values().filter(|item| !servable(item)).map(|item| item.item_id.clone()).collect();
                *self.unservable.write().expect("catalogue lock") = Arc::new(ids);
            }
        }
        self.revision.fetch_max(revision, std::sync::atomic::Ordering::AcqRel);
    }
}

async fn poll(catalog: Arc<Catalog>, mut client: CatalogServiceClient<tonic::transport::Channel>, every: Duration) {
    let mut failing = false;
    loop {
        let request = CatalogChangesRequest { since_revision: catalog.revision(), limit: 0 };
        match client.catalog_changes(request).await {
            Ok(response) => {
                let response = response.into_inner();
                if failing {
                    tracing::info!(revision = response.revision, "catalogue changes reachable again");
                    failing = false;
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
        assert_eq!(catalog.get_many(["a", "b"]).iter().map(Option::is_some).collect::<Vec<_>>(), [true, false]);
    }
}
