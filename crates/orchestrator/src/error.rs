use recsys_runtime::resilience::CallError;
use tonic::Status;

use crate::domain::Stage;

#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{stage} stage failed: {source}")]
    Stage {
        stage: Stage,
        #[source]
        source: CallError,
    },
    #[error("configuration: {0}")]
    Config(String),
}

pub type Result<T, E = OrchestratorError> = std::result::Result<T, E>;

impl From<OrchestratorError> for Status {
    fn from(error: OrchestratorError) -> Self {
        match &error {
            OrchestratorError::InvalidArgument(message) => Status::invalid_argument(message),
            OrchestratorError::Stage { source: CallError::DeadlineExceeded, .. } => {
                Status::deadline_exceeded(error.to_string())
            }
            OrchestratorError::Stage { source: CallError::CircuitOpen(_) | CallError::Status(_), .. } => {
                Status::unavailable(error.to_string())
            }
            OrchestratorError::Config(_) => Status::internal(error.to_string()),
        }
    }
}
