use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("deadline exceeded during {stage}")]
    DeadlineExceeded { stage: &'static str },
    #[error("{service} unavailable: {reason}")]
    Unavailable { service: &'static str, reason: String },
    #[error("downstream configuration: {0}")]
    Config(String),
}

pub type Result<T, E = OrchestratorError> = std::result::Result<T, E>;

impl From<OrchestratorError> for Status {
    fn from(error: OrchestratorError) -> Self {
        match error {
            OrchestratorError::InvalidArgument(message) => Status::invalid_argument(message),
            OrchestratorError::DeadlineExceeded { .. } => Status::deadline_exceeded(error.to_string()),
            OrchestratorError::Unavailable { .. } => Status::unavailable(error.to_string()),
            OrchestratorError::Config(_) => Status::internal(error.to_string()),
        }
    }
}
