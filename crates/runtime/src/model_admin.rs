//! The `ModelAdmin` gRPC surface over a service's bundle registry: list, load (and make
//! current), retire. Shared by every bundle consumer; the registry does the work.

use std::sync::Arc;

use recsys_bundle::{BundleError, Registry};
use recsys_proto::v1::{
    model_admin_server::{ModelAdmin, ModelAdminServer},
    ListModelsRequest, LoadModelRequest, ModelVersion, ModelVersions, RetireModelRequest,
};
use tonic::{Request, Response, Status};

pub const MODEL_ADMIN_SERVICE_NAME: &str = "recsys.v1.ModelAdmin";

pub struct ModelAdminGrpc<T> {
    service: &'static str,
    registry: Arc<Registry<T>>,
}

impl<T: Send + Sync + 'static> ModelAdminGrpc<T> {
    pub fn new(service: &'static str, registry: Arc<Registry<T>>) -> Self {
        Self { service, registry }
    }

    pub fn into_server(self) -> ModelAdminServer<Self> {
        ModelAdminServer::new(self)
    }

    fn versions(&self) -> ModelVersions {
        ModelVersions {
            service: self.service.to_string(),
            versions: self
                .registry
                .list()
                .into_iter()
                .map(|info| ModelVersion {
                    version: info.version,
                    current: info.current,
                    created_at: info.created_at,
                    metrics: info.metrics.into_iter().collect(),
                })
                .collect(),
        }
    }

    /// Runs a registry operation (loads are heavy) on a blocking thread.
    async fn blocking<R: Send + 'static>(
        &self,
        operation: impl FnOnce(&Registry<T>) -> recsys_bundle::Result<R> + Send + 'static,
    ) -> Result<R, Status> {
        let registry = Arc::clone(&self.registry);
        tokio::task::spawn_blocking(move || operation(&registry))
            .await
            .map_err(|error| Status::internal(format!("model admin task failed: {error}")))?
            .map_err(status_of)
    }
}

/// The version a request runs on: the one it is pinned to (recall chose it upstream;
/// loaded now, on a blocking thread, if this replica has not loaded it yet), else the
/// current one. The caller keeps the `Arc` to the end of the request, whatever the
/// current version becomes meanwhile.
pub async fn version_for<T: Send + Sync + 'static>(
    registry: &Arc<Registry<T>>,
    pinned: &str,
) -> Result<Arc<T>, BundleError> {
    if pinned.is_empty() {
        return Ok(registry.current().1);
    }
    if let Some(version) = registry.get(pinned) {
        return Ok(version);
    }
    let (registry, pinned) = (Arc::clone(registry), pinned.to_string());
    tokio::task::spawn_blocking(move || registry.get_or_load(&pinned)).await.map_err(|error| BundleError::Rejected {
        version: String::new(),
        reason: format!("loading task failed: {error}"),
    })?
}

/// A bundle error as the operator should read it.
pub fn status_of(error: BundleError) -> Status {
    match error {
        BundleError::NotFound(_) => Status::not_found(error.to_string()),
        BundleError::Rejected { .. } | BundleError::Malformed { .. } | BundleError::Io { .. } => {
            Status::failed_precondition(error.to_string())
        }
    }
}

#[tonic::async_trait]
impl<T: Send + Sync + 'static> ModelAdmin for ModelAdminGrpc<T> {
    async fn list_models(&self, _request: Request<ListModelsRequest>) -> Result<Response<ModelVersions>, Status> {
        Ok(Response::new(self.versions()))
    }

    async fn load_model(&self, request: Request<LoadModelRequest>) -> Result<Response<ModelVersions>, Status> {
        let operator = crate::admin_auth::Operator::of(&request).to_string();
        let LoadModelRequest { version, make_current, force } = request.into_inner();
        if version.len() > recsys_proto::limits::MAX_ID_BYTES {
            return Err(Status::invalid_argument("version is too long"));
        }
        let requested = version.clone();
        self.blocking(move |registry| {
            registry.load((!version.is_empty()).then_some(version.as_str()), make_current, force)
        })
        .await?;
        tracing::info!(%operator, version = %requested, make_current, force, "model version loaded");
        Ok(Response::new(self.versions()))
    }

    async fn retire_model(&self, request: Request<RetireModelRequest>) -> Result<Response<ModelVersions>, Status> {
        let operator = crate::admin_auth::Operator::of(&request).to_string();
        let RetireModelRequest { version } = request.into_inner();
        if version.is_empty() {
            return Err(Status::invalid_argument("version is required"));
        }
        let retired = version.clone();
        self.blocking(move |registry| registry.retire(&version)).await?;
        tracing::info!(%operator, version = %retired, "model version retired");
        Ok(Response::new(self.versions()))
    }
}
