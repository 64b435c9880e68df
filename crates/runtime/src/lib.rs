//! The shared runtime of every recsys service: how a service reads its configuration,
//! logs, binds and serves gRPC (with health, reflection and graceful shutdown), and
//! connects to the services it calls. Service crates hold only their own domain logic.

pub mod admin_auth;
pub mod catalog;
pub mod certs;
pub mod client;
pub mod config;
mod connections;
pub mod item_features;
pub mod metrics;
pub mod model_admin;
mod observe;
mod oversized;
pub mod resilience;
pub mod server;
mod shed;
pub mod telemetry;
pub mod tls;

pub use config::{load_config, ConfigError};
pub use connections::ConnectionConfig;
pub use server::{run_service, serve, Listeners, ServeOptions, Served, ServerConfig};
pub use tls::Tls;
