//! Minimal reflection clients (v1 and v1alpha): list the services a server advertises,
//! as `grpcurl list` does.

use tonic::transport::Channel;
use tonic_reflection::pb::{v1, v1alpha};

/// The two reflection versions have identical messages in different modules.
macro_rules! list_services {
    ($name:ident, $version:ident) => {
        pub async fn $name(channel: Channel) -> anyhow::Result<Vec<String>> {
            use $version::{
                server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse, ServerReflectionRequest,
            };
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut stream = ServerReflectionClient::new(channel)
                .server_reflection_info(tokio_stream::iter([request]))
                .await?
                .into_inner();
            match stream.message().await?.and_then(|response| response.message_response) {
                Some(MessageResponse::ListServicesResponse(list)) => {
                    Ok(list.service.into_iter().map(|s| s.name).collect())
                }
                other => anyhow::bail!("unexpected reflection answer {other:?}"),
            }
        }
    };
}

list_services!(list_services_v1, v1);
list_services!(list_services_v1alpha, v1alpha);
