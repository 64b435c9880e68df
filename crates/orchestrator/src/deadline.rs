//! The caller's deadline, read from the `grpc-timeout` header.

use std::time::Duration;

use tokio::time::Instant;

/// Time kept back from the caller's deadline for our own work after the last call.
const RESERVE: Duration = Duration::from_millis(2);

#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
}

impl Deadline {
    pub fn after(timeout: Duration) -> Self {
        Self { at: Instant::now() + timeout }
    }

    /// From request metadata, else `default`.
    pub fn from_metadata(metadata: &tonic::metadata::MetadataMap, default: Duration) -> Self {
        let timeout = metadata
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_grpc_timeout)
            .unwrap_or(default);
        Self::after(timeout)
    }

    /// When downstream calls must have answered: the deadline less what building the
    /// response needs. Each client stack caps it further by its stage's budget.
    pub fn for_calls(&self) -> Instant {
        self.at.checked_sub(RESERVE).unwrap_or(self.at)
    }

    /// What is left for downstream calls, `None` when nothing is.
    pub fn remaining(&self) -> Option<Duration> {
        let left = self.for_calls().saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }
}

/// Parses the gRPC wire format: up to 8 digits then a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units_parse() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("100u"), Some(Duration::from_micros(100)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789m"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_keep_a_reserve_for_the_response() {
        let deadline = Deadline::after(Duration::from_millis(100));
        assert_eq!(deadline.for_calls(), Instant::now() + Duration::from_millis(98));
        tokio::time::advance(Duration::from_millis(90)).await;
        assert_eq!(deadline.remaining(), Some(Duration::from_millis(8)));
        tokio::time::advance(Duration::from_millis(20)).await;
        assert_eq!(deadline.remaining(), None);
    }
}
