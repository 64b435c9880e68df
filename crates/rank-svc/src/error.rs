use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum RankError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Bundle(#[from] recsys_bundle::BundleError),
    #[error("onnx runtime: {0}")]
    Onnx(String),
    #[error("model {model}: {reason}")]
    ModelContract { model: String, reason: String },
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("the request is pinned to bundle {pinned}, which this rank-svc (serving {served}) cannot load: {reason}")]
    PinnedBundleUnavailable { pinned: String, served: String, reason: String },
}

pub type Result<T, E = RankError> = std::result::Result<T, E>;

impl From<RankError> for Status {
    fn from(error: RankError) -> Self {
        match error {
            RankError::InvalidArgument(message) => Status::invalid_argument(message),
            RankError::Bundle(_) | RankError::ModelContract { .. } | RankError::PinnedBundleUnavailable { .. } => {
                Status::failed_precondition(error.to_string())
            }
            RankError::Overloaded(_) => Status::resource_exhausted(error.to_string()),
            RankError::Onnx(_) => Status::internal(error.to_string()),
        }
    }
}
