//! The run-time catalogue's gRPC surface: product teams upsert and retire items' metadata
//! (stock, promotion, publish time, attributes) without a new bundle, through
//! `CatalogAdmin` on the admin port; recall-svc and rerank-svc follow the change log
//! (`CatalogService.CatalogChanges`, on the API port) and apply it within their poll
//! interval. The store persists the records durably (both backends).

use std::sync::Arc;

use recsys_proto::{
    limits::{MAX_CATALOG_ITEMS_PER_CALL, MAX_CONTEXT_VALUE_BYTES, MAX_ID_BYTES, MAX_ITEM_ATTRIBUTES},
    v1::{
        catalog_admin_server::{CatalogAdmin, CatalogAdminServer},
        catalog_service_server::{CatalogService, CatalogServiceServer},
        Availability, CatalogChangesRequest, CatalogChangesResponse, CatalogItem, CatalogWriteResponse,
        RetireItemsRequest, UpsertItemsRequest,
    },
};
use recsys_runtime::admin_auth::Operator;
use tonic::{Request, Response, Status};

use crate::{service::check_id, FeatureError, FeatureStore};

pub const CATALOG_SERVICE_NAME: &str = "recsys.v1.CatalogService";
pub const CATALOG_ADMIN_SERVICE_NAME: &str = "recsys.v1.CatalogAdmin";

static CATALOG_WRITES: std::sync::LazyLock<prometheus::IntCounterVec> = std::sync::LazyLock::new(|| {
    prometheus::register_int_counter_vec!(
        "recsys_catalog_writes_total",
        "Catalogue records written at run time, by kind (upsert, retire)",
        &["kind"]
    )
    .expect("metric registers once")
});

#[derive(Clone)]
pub struct CatalogGrpc {
    store: Arc<dyn FeatureStore>,
}

impl CatalogGrpc {
    pub fn new(store: Arc<dyn FeatureStore>) -> Self {
        Self { store }
    }

    pub fn into_server(self) -> CatalogServiceServer<Self> {
        CatalogServiceServer::new(self)
    }

    pub fn into_admin_server(self) -> CatalogAdminServer<Self> {
        CatalogAdminServer::new(self)
    }
}

fn check_count(what: &str, count: usize) -> Result<(), FeatureError> {
    match count {
        0 => Err(FeatureError::InvalidArgument(format!("{what} is empty"))),
        n if n > MAX_CATALOG_ITEMS_PER_CALL => Err(FeatureError::InvalidArgument(format!(
            "{n} {what} in one call; at most {MAX_CATALOG_ITEMS_PER_CALL} allowed"
        ))),
        _ => Ok(()),
    }
}

/// Checks one record of an upsert; `at` names it in the error.
fn check_item(at: &str, item: &CatalogItem) -> Result<(), FeatureError> {
    let invalid = |message: String| Err(FeatureError::InvalidArgument(format!("{at}: {message}")));
    check_id(&format!("{at}.item_id"), &item.item_id)?;
    if Availability::try_from(item.availability).is_err() {
        return invalid(format!("availability {} is not a known value", item.availability));
    }
    if item.publish_time_ms < 0 {
        return invalid(format!("publish_time_ms {} is negative", item.publish_time_ms));
    }
    if item.category.len() > MAX_ID_BYTES {
        return invalid(format!("category is longer than {MAX_ID_BYTES} bytes"));
    }
    if item.attributes.len() > MAX_ITEM_ATTRIBUTES {
        return invalid(format!("{} attributes; at most {MAX_ITEM_ATTRIBUTES} allowed", item.attributes.len()));
    }
    for (key, value) in &item.attributes {
        if key.is_empty() || key.len() > MAX_ID_BYTES {
            return invalid(format!("attribute names must be 1 to {MAX_ID_BYTES} bytes"));
        }
        if value.len() > MAX_CONTEXT_VALUE_BYTES {
            return invalid(format!("attributes[{key:?}] is longer than {MAX_CONTEXT_VALUE_BYTES} bytes"));
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl CatalogAdmin for CatalogGrpc {
    async fn upsert_items(
        &self,
        request: Request<UpsertItemsRequest>,
    ) -> Result<Response<CatalogWriteResponse>, Status> {
        let operator = Operator::of(&request).to_string();
        let UpsertItemsRequest { items } = request.into_inner();
        check_count("items", items.len())?;
        for (index, item) in items.iter().enumerate() {
            check_item(&format!("items[{index}]"), item)?;
        }
        let count = items.len();
        let revision = self.store.upsert_catalog(items).await?;
        CATALOG_WRITES.with_label_values(&["upsert"]).inc_by(count as u64);
        tracing::info!(%operator, items = count, revision, "catalogue items upserted");
        Ok(Response::new(CatalogWriteResponse { revision }))
    }

    async fn retire_items(
        &self,
        request: Request<RetireItemsRequest>,
    ) -> Result<Response<CatalogWriteResponse>, Status> {
        let operator = Operator::of(&request).to_string();
        let RetireItemsRequest { item_ids } = request.into_inner();
        check_count("item_ids", item_ids.len())?;
        for (index, id) in item_ids.iter().enumerate() {
            check_id(&format!("item_ids[{index}]"), id)?;
        }
        let count = item_ids.len();
        // A retired item's record is a tombstone: its other metadata no longer matters.
        let tombstones =
            item_ids.into_iter().map(|item_id| CatalogItem { item_id, retired: true, ..CatalogItem::default() });
        let revision = self.store.upsert_catalog(tombstones.collect()).await?;
        CATALOG_WRITES.with_label_values(&["retire"]).inc_by(count as u64);
        tracing::info!(%operator, items = count, revision, "catalogue items retired");
        Ok(Response::new(CatalogWriteResponse { revision }))
    }
}

#[tonic::async_trait]
impl CatalogService for CatalogGrpc {
    async fn catalog_changes(
        &self,
        request: Request<CatalogChangesRequest>,
    ) -> Result<Response<CatalogChangesResponse>, Status> {
        let CatalogChangesRequest { since_revision, limit } = request.into_inner();
        let limit = match limit as usize {
            0 => MAX_CATALOG_ITEMS_PER_CALL,
            n => n.min(MAX_CATALOG_ITEMS_PER_CALL),
        };
        let (items, head_revision) = self.store.catalog_changes(since_revision, limit).await?;
        let revision = items.last().map_or(since_revision, |item| item.revision);
        let more = items.len() == limit;
        Ok(Response::new(CatalogChangesResponse { items, revision, more, head_revision }))
    }
}
