//! What recsysctl's commands share with tests: canary analysis against Prometheus.

pub mod canary_analysis;
