use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum RerankError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Bundle(#[from] recsys_bundle::BundleError),
    #[error(
        "the request is pinned to bundle {pinned}, which this rerank-svc (serving {served}) cannot load: {reason}"
    )]
    PinnedBundleUnavailable { pinned: String, served: String, reason: String },
}

pub type Result<T, E = RerankError> = std::result::Result<T, E>;

impl From<RerankError> for Status {
    fn from(error: RerankError) -> Self {
        match error {
            RerankError::InvalidArgument(message) => Status::invalid_argument(message),
            RerankError::Bundle(_) | RerankError::PinnedBundleUnavailable { .. } => {
                Status::failed_precondition(error.to_string())
            }
        }
    }
}
