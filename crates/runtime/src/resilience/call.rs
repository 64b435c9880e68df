//! What travels through a client stack: one logical call and the ways it can fail.

use std::sync::Arc;

use tokio::time::Instant;

use super::CircuitOpen;

/// One logical call to a downstream service. The message is shared by every attempt (a
/// retry sends the same bytes without copying the request), and `deadline` is the moment
/// after which the answer is useless to the caller; the timeout layer tightens it to the
/// stage's budget and the transport propagates it as `grpc-timeout`.
#[derive(Debug)]
pub struct Call<M> {
    pub message: Arc<M>,
    pub deadline: Instant,
}

impl<M> Call<M> {
    pub fn new(message: Arc<M>, deadline: Instant) -> Self {
        Self { message, deadline }
    }
}

impl<M> Clone for Call<M> {
    fn clone(&self) -> Self {
        Self { message: Arc::clone(&self.message), deadline: self.deadline }
    }
}

/// Why a call through a client stack failed, by type: the retry layer never retries an
/// open breaker, and the caller tells "the callee answered with an error" from "we gave up".
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The callee (or the transport) answered with this status.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    /// The callee's breaker is open: no request was sent.
    #[error(transparent)]
    CircuitOpen(#[from] CircuitOpen),
    /// The stage's budget or the caller's deadline ran out.
    #[error("deadline exceeded")]
    DeadlineExceeded,
}

impl CallError {
    /// Whether the failure says something about the callee's health. A caller's bad
    /// request, a shed request (the callee protecting itself, answering fast) or a refusal
    /// that names a configuration mismatch do not.
    pub fn counts_against_breaker(&self) -> bool {
        match self {
            CallError::Status(status) => matches!(
                status.code(),
                // tonic reports a callee-side timeout as CANCELLED "Timeout expired".
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::Internal
                    | tonic::Code::Unknown
                    | tonic::Code::DataLoss
            ),
            CallError::DeadlineExceeded => true,
            CallError::CircuitOpen(_) => false,
        }
    }
}

impl From<tonic::Status> for CallError {
    fn from(status: tonic::Status) -> Self {
        CallError::Status(status)
    }
}
