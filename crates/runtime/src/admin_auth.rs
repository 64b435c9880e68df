//! Authorisation of admin calls, a tower layer on every admin port. A call needs an
//! operator identity: a bearer token from the token file (a mounted Secret), or, with TLS
//! on, the verified client certificate's DNS name. No identity (or an unknown token) is
//! UNAUTHENTICATED; an identity not on `allowed_operators` is PERMISSION_DENIED. Every
//! call that passes is logged with who made it, and handlers find the caller as an
//! [`Operator`] in the request's extensions to log what they changed. It wraps each admin
//! service, not the port: health and reflection beside them stay open, since they change
//! nothing and probes must not need a secret.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use serde::{Deserialize, Serialize};
use tonic::{
    body::Body,
    codegen::http::{header::AUTHORIZATION, HeaderMap, Request, Response},
    metadata::{errors::InvalidMetadataValue, Ascii, MetadataValue},
    server::NamedService,
    service::Interceptor,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
    Status,
};
use tower::{Layer, Service, ServiceExt};

/// The `[server.admin]` section of every service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// `host:port` of the admin port, which serves only the admin services, so that a
    /// network policy can fence it.
    pub listen: String,
    /// Identities allowed to call admin RPCs: a token's name or a certificate's DNS name.
    pub allowed_operators: Vec<String>,
    /// File of `name:token` lines (`#` starts a comment), read on every admin call so that
    /// a rotated Secret takes effect at once. Empty: no token is accepted.
    pub token_file: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".to_string(),
            allowed_operators: vec!["operator".to_string()],
            token_file: String::new(),
        }
    }
}

/// Who made an admin call; in the request's extensions once authorised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator(pub String);

impl Operator {
    /// The caller of an admin request, for the handler's log line.
    pub fn of<T>(request: &tonic::Request<T>) -> &str {
        request.extensions().get::<Operator>().map_or("unknown", |operator| operator.0.as_str())
    }
}

#[derive(Debug)]
struct Policy {
    service: &'static str,
    allowed: Vec<String>,
    token_file: String,
}

#[derive(Clone)]
pub struct AdminAuthLayer {
    policy: Arc<Policy>,
}

impl AdminAuthLayer {
    pub fn new(service: &'static str, config: &AdminConfig) -> Self {
        if config.token_file.is_empty() {
            tracing::info!(service, "admin port: no token file, only client certificates identify operators");
        }
        Self {
            policy: Arc::new(Policy {
                service,
                allowed: config.allowed_operators.clone(),
                token_file: config.token_file.clone(),
            }),
        }
    }
}

impl AdminAuthLayer {
    /// `service` behind the check (the `Layer` impl, without importing the trait).
    pub fn guard<S>(&self, service: S) -> AdminAuth<S> {
        self.layer(service)
    }
}

impl<S> Layer<S> for AdminAuthLayer {
    type Service = AdminAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdminAuth { inner, policy: Arc::clone(&self.policy) }
    }
}

/// An admin service behind the check; routed under the wrapped service's name.
#[derive(Clone)]
pub struct AdminAuth<S> {
    inner: S,
    policy: Arc<Policy>,
}

impl<S: NamedService> NamedService for AdminAuth<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<Request<B>> for AdminAuth<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible> + NamedService + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let path = request.uri().path().to_string();
        let inner = self.inner.clone();
        let policy = &self.policy;
        let peer_names = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs)
            .map(|chain| chain.first().map(crate::tls::certificate_names).unwrap_or_default());
        let decision = policy.authorise(request.headers(), peer_names.as_deref());
        let outcome = match &decision {
            Ok(_) => "allowed",
            Err(status) if status.code() == tonic::Code::Unauthenticated => "unauthenticated",
            Err(_) => "denied",
        };
        // Labelled by the admin service, not the path: any path under it reaches this
        // layer, and an anonymous caller must not be able to mint metric series.
        crate::metrics::ADMIN_CALLS.with_label_values(&[policy.service, S::NAME, outcome]).inc();
        match decision {
            Ok(operator) => {
                tracing::info!(service = policy.service, method = %path, operator = %operator.0, "admin call");
                request.extensions_mut().insert(operator);
                Box::pin(inner.oneshot(request))
            }
            Err(status) => {
                tracing::warn!(service = policy.service, method = %path, reason = status.message(), "admin call refused");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

impl Policy {
    fn authorise(&self, headers: &HeaderMap, peer_names: Option<&[String]>) -> Result<Operator, Status> {
        if let Some(value) = headers.get(AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|value| value.strip_prefix("Bearer "))
                .map(str::trim)
                .filter(|token| !token.is_empty())
                .ok_or_else(|| Status::unauthenticated("the authorization header is not `Bearer <token>`"))?;
            let name =
                self.token_owner(token).ok_or_else(|| Status::unauthenticated("the bearer token is not known"))?;
            return self.allow(name);
        }
        if let Some(names) = peer_names {
            return match names.iter().find(|name| self.allowed.contains(name)) {
                Some(name) => Ok(Operator(name.clone())),
                None => Err(Status::permission_denied(format!(
                    "the client certificate's names {names:?} are not allowed operators"
                ))),
            };
        }
        Err(Status::unauthenticated(
            "admin calls need an operator identity: a client certificate (TLS) or `authorization: Bearer <token>`",
        ))
    }

    fn allow(&self, name: String) -> Result<Operator, Status> {
        if self.allowed.contains(&name) {
            Ok(Operator(name))
        } else {
            Err(Status::permission_denied(format!("operator {name} is not allowed to call admin RPCs")))
        }
    }

    /// The name whose token this is, reading the file now (it may have been rotated).
    fn token_owner(&self, token: &str) -> Option<String> {
        if self.token_file.is_empty() {
            return None;
        }
        let text = match std::fs::read_to_string(&self.token_file) {
            Ok(text) => text,
            Err(error) => {
                tracing::error!(file = %self.token_file, %error, "admin token file unreadable: no token is accepted");
                return None;
            }
        };
        // Every line is compared, in constant time each, so the time taken says nothing
        // about which token came close.
        let mut owner = None;
        for (name, known) in parse_tokens(&text) {
            if same_secret(known.as_bytes(), token.as_bytes()) && owner.is_none() {
                owner = Some(name.to_string());
            }
        }
        owner
    }
}

/// `name:token` lines; blank lines and `#` comments skipped. The admin ports read their
/// token file with it, and clients (`recsysctl`) the same file.
pub fn parse_tokens(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once(':'))
        .map(|(name, token)| (name.trim(), token.trim()))
        .filter(|(name, token)| !name.is_empty() && !token.is_empty())
}

/// The client side of the check: adds `authorization: Bearer <token>` to every call of a
/// client built `with_interceptor`; without a token, calls go out as they are.
#[derive(Debug, Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    pub fn new(token: &str) -> Result<Self, InvalidMetadataValue> {
        Ok(Self(Some(MetadataValue::try_from(format!("Bearer {token}"))?)))
    }

    pub fn none() -> Self {
        Self(None)
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert(AUTHORIZATION.as_str(), value.clone());
        }
        Ok(request)
    }
}

fn same_secret(known: &[u8], offered: &[u8]) -> bool {
    known.len() == offered.len() && known.iter().zip(offered).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn layer(tokens: &str, allowed: &[&str]) -> (AdminAuthLayer, tempfile::NamedTempFile) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(tokens.as_bytes()).unwrap();
        let config = AdminConfig {
            listen: String::new(),
            allowed_operators: allowed.iter().map(|name| name.to_string()).collect(),
            token_file: file.path().display().to_string(),
        };
        (AdminAuthLayer::new("Test", &config), file)
    }

    /// Answers OK with the operator the layer found in an `operator` header.
    fn echo_operator(
    ) -> impl Service<Request<()>, Response = Response<Body>, Error = Infallible, Future: Send> + Clone + Send {
        tower::service_fn(|request: Request<()>| async move {
            let operator = request.extensions().get::<Operator>().map_or("none".to_string(), |op| op.0.clone());
            let mut response = Status::ok("").into_http::<Body>();
            response.headers_mut().insert("operator", operator.parse().unwrap());
            Ok::<_, Infallible>(response)
        })
    }

    fn call(path: &str, authorization: Option<&str>) -> Request<()> {
        let mut builder = Request::builder().uri(path);
        if let Some(value) = authorization {
            builder = builder.header(AUTHORIZATION, value);
        }
        builder.body(()).unwrap()
    }

    /// A service under an admin service's name, as the generated servers are.
    #[derive(Clone)]
    struct Named<S>(S);

    impl<S> NamedService for Named<S> {
        const NAME: &'static str = "test.Admin";
    }

    impl<S: Service<Request<()>>> Service<Request<()>> for Named<S> {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.0.poll_ready(cx)
        }

        fn call(&mut self, request: Request<()>) -> Self::Future {
            self.0.call(request)
        }
    }

    async fn status_of(layer: &AdminAuthLayer, request: Request<()>) -> Result<String, Status> {
        let response = layer.layer(Named(echo_operator())).oneshot(request).await.unwrap();
        match Status::from_header_map(response.headers()) {
            Some(status) if status.code() != tonic::Code::Ok => Err(status),
            _ => Ok(response.headers()["operator"].to_str().unwrap().to_string()),
        }
    }

    #[tokio::test]
    async fn a_known_token_of_an_allowed_operator_passes_and_names_the_caller() {
        let (layer, _file) = layer("# operators\nalice: s3cret\nbob:other\n", &["alice"]);
        let answer = status_of(&layer, call("/recsys.v1.Admin/SetCanaryShare", Some("Bearer s3cret"))).await;
        assert_eq!(answer.unwrap(), "alice");
    }

    #[tokio::test]
    async fn no_identity_or_an_unknown_token_is_unauthenticated() {
        let (layer, _file) = layer("alice:s3cret\n", &["alice"]);
        for authorization in [None, Some("Bearer wrong"), Some("Basic s3cret"), Some("Bearer "), Some("Bearer s3cre")] {
            let refused = status_of(&layer, call("/recsys.v1.Admin/SetCanaryShare", authorization)).await.unwrap_err();
            assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{authorization:?}: {refused:?}");
        }
    }

    #[tokio::test]
    async fn a_known_operator_not_on_the_allow_list_is_denied() {
        let (layer, _file) = layer("alice:s3cret\nbob:other\n", &["alice"]);
        let refused =
            status_of(&layer, call("/recsys.v1.ModelAdmin/LoadModel", Some("Bearer other"))).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(refused.message().contains("bob"), "{refused:?}");
    }

    #[tokio::test]
    async fn a_rotated_token_file_takes_effect_on_the_next_call() {
        let (layer, file) = layer("alice:first\n", &["alice"]);
        assert!(status_of(&layer, call("/recsys.v1.Admin/GetTrafficSplit", Some("Bearer first"))).await.is_ok());
        std::fs::write(file.path(), "alice:second\n").unwrap();
        let old = status_of(&layer, call("/recsys.v1.Admin/GetTrafficSplit", Some("Bearer first"))).await;
        assert_eq!(old.unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(status_of(&layer, call("/recsys.v1.Admin/GetTrafficSplit", Some("Bearer second"))).await.is_ok());
    }

    #[test]
    fn verified_certificate_names_are_checked_against_the_allow_list() {
        let policy = Policy { service: "Test", allowed: vec!["operator".to_string()], token_file: String::new() };
        let headers = HeaderMap::new();
        let allowed = policy.authorise(&headers, Some(&["operator".to_string()])).unwrap();
        assert_eq!(allowed, Operator("operator".to_string()));
        let denied = policy.authorise(&headers, Some(&["recall-svc".to_string(), "localhost".to_string()]));
        assert_eq!(denied.unwrap_err().code(), tonic::Code::PermissionDenied);
        let anonymous = policy.authorise(&headers, None);
        assert_eq!(anonymous.unwrap_err().code(), tonic::Code::Unauthenticated);
    }
}
