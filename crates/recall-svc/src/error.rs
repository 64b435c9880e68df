use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum RecallError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Bundle(#[from] recsys_bundle::BundleError),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = RecallError> = std::result::Result<T, E>;

impl From<RecallError> for Status {
    fn from(error: RecallError) -> Self {
        match error {
            RecallError::InvalidArgument(message) => Status::invalid_argument(message),
            RecallError::Bundle(error) => Status::failed_precondition(error.to_string()),
            RecallError::Internal(message) => Status::internal(message),
        }
    }
}
