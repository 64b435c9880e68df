//! Load shedding for application calls, never for probes. Beyond `limit` calls in flight
//! a new call is refused at once (tonic answers RESOURCE_EXHAUSTED) instead of queueing
//! into its deadline. Health checks and reflection bypass the limit: an overloaded
//! server that failed its readiness or liveness probes would be taken out of rotation or
//! restarted, turning a burst of load into an outage.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::sync::Semaphore;
use tonic::codegen::http::Request;
use tower::{limit::ConcurrencyLimit, load_shed::LoadShed, BoxError, Layer, Service, ServiceExt};

/// Paths of the calls that are never shed.
const PROBE_PREFIXES: [&str; 3] =
    ["/grpc.health.v1.Health/", "/grpc.reflection.v1.ServerReflection/", "/grpc.reflection.v1alpha.ServerReflection/"];

pub(crate) fn is_probe(path: &str) -> bool {
    PROBE_PREFIXES.iter().any(|prefix| path.starts_with(prefix))
}

/// One semaphore for the whole server, whichever connection a call arrives on.
#[derive(Clone)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
}

impl ShedLayer {
    pub fn new(limit: usize) -> Self {
        Self { permits: Arc::new(Semaphore::new(limit)) }
    }
}

impl<S: Clone> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        // Shedding sits in front of the limit, so a call finding no free permit is refused
        // rather than waiting for one: a queued call would only spend its deadline there.
        let limited = LoadShed::new(ConcurrencyLimit::with_semaphore(inner.clone(), Arc::clone(&self.permits)));
        Shed { direct: inner, limited }
    }
}

#[derive(Clone)]
pub struct Shed<S> {
    direct: S,
    limited: LoadShed<ConcurrencyLimit<S>>,
}

impl<S, B> Service<Request<B>> for Shed<S>
where
    S: Service<Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is decided per call, once its path says which way it goes: polling the
        // limited side here would take a permit that a probe then never gives back.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if is_probe(request.uri().path()) {
            let direct = self.direct.clone();
            Box::pin(async move { direct.oneshot(request).await.map_err(Into::into) })
        } else {
            let limited = self.limited.clone();
            Box::pin(limited.oneshot(request))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn health_and_reflection_are_probes_and_nothing_else_is() {
        assert!(is_probe("/grpc.health.v1.Health/Check"));
        assert!(is_probe("/grpc.health.v1.Health/Watch"));
        assert!(is_probe("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"));
        assert!(is_probe("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
        assert!(!is_probe("/recsys.v1.Recommender/Recommend"));
        assert!(!is_probe("/grpc.health.v1.HealthX/Check"));
    }

    fn request(path: &str) -> Request<()> {
        Request::builder().uri(path).body(()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_limit_calls_are_shed_but_probes_are_served() {
        let slow = tower::service_fn(|_: Request<()>| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, BoxError>("answered")
        });
        let service = ShedLayer::new(1).layer(slow);
        let in_flight = tokio::spawn(service.clone().oneshot(request("/recsys.v1.Recommender/Recommend")));
        tokio::task::yield_now().await;
        let shed = service.clone().oneshot(request("/recsys.v1.Recommender/Recommend")).await.unwrap_err();
        assert!(shed.is::<tower::load_shed::error::Overloaded>(), "{shed}");
        let probe = service.clone().oneshot(request("/grpc.health.v1.Health/Check")).await.unwrap();
        assert_eq!(probe, "answered");
        assert_eq!(in_flight.await.unwrap().unwrap(), "answered");
        // The permit came back: the next call is served.
        assert_eq!(service.oneshot(request("/recsys.v1.Recommender/Recommend")).await.unwrap(), "answered");
    }
}
