use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum RerankError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Bundle(#[from] recsys_bundle::BundleError),
}

pub type Result<T, E = RerankError> = std::result::Result<T, E>;

impl From<RerankError> for Status {
    fn from(error: RerankError) -> Self {
        match error {
            RerankError::InvalidArgument(message) => Status::invalid_argument(message),
            RerankError::Bundle(error) => Status::failed_precondition(error.to_string()),
        }
    }
}
