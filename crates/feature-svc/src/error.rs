use std::path::PathBuf;

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("feature store {store}: {reason}")]
    Store { store: String, reason: String },
    #[error("seed data {path}: {reason}")]
    Seed { path: PathBuf, reason: String },
}

pub type Result<T, E = FeatureError> = std::result::Result<T, E>;

impl From<FeatureError> for Status {
    fn from(error: FeatureError) -> Self {
        match error {
            FeatureError::InvalidArgument(message) => Status::invalid_argument(message),
            // Not acknowledged, so the caller may retry: nothing acknowledged is lost.
            FeatureError::Store { .. } => Status::unavailable(error.to_string()),
            FeatureError::Seed { .. } => Status::internal(error.to_string()),
        }
    }
}
