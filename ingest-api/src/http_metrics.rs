//! HTTP metrics: requests by route template, method and status, their
//! duration, and the bytes of their bodies, recorded by a middleware on
//! every route (see `larder_service::metrics` for the names).
//!
//! Each route carries its own [`RouteMetrics`], made when the router is
//! built, so the route label is the template (`/{cache}/{file}`), never the
//! path, and a request looks nothing up by name: its method picks a slot,
//! its status an index, each filled once on first use (a lookup in the
//! family takes its lock and allocates). After that a request costs a few
//! relaxed atomic operations, the duration histogram child's own mutex
//! (prometheus-client's histogram is not atomic) and one allocation per
//! body it wraps; no lock shared with other routes or methods.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::Response;
use axum::routing::MethodRouter;
use axum::Router;
use http_body::{Frame, SizeHint};

use larder_service::metrics::{larder, Counter, Histogram};

/// The route label of requests no route took: an unknown path, or a known
/// one without the request's method.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The methods counted by name; any other is counted as `other`.
const METHODS: [&str; 7] = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "other"];

/// Statuses run from 100 to 999 (the `http` crate's range).
const FIRST_STATUS: u16 = 100;
const STATUSES: usize = 900;

/// One route's metrics, its children resolved per method on first use.
#[derive(Debug)]
pub struct RouteMetrics {
    route: &'static str,
    methods: [OnceLock<MethodMetrics>; METHODS.len()],
}

#[derive(Debug)]
struct MethodMetrics {
    route: &'static str,
    method: &'static str,
    /// `larder_http_requests_total` by status, indexed from [`FIRST_STATUS`].
    statuses: Box<[OnceLock<Counter>]>,
    duration: Histogram,
    request_bytes: Counter,
    response_bytes: Counter,
}

impl RouteMetrics {
    pub fn new(route: &'static str) -> Arc<Self> {
        Arc::new(Self {
            route,
            methods: Default::default(),
        })
    }

    fn for_method(&self, method: &Method) -> &MethodMetrics {
        let slot = METHODS
            .iter()
            .position(|name| *name == method.as_str())
            .unwrap_or(METHODS.len() - 1);
        self.methods[slot].get_or_init(|| {
            let metrics = larder();
            let labels = [self.route, METHODS[slot]];
            MethodMetrics {
                route: self.route,
                method: METHODS[slot],
                statuses: (0..STATUSES).map(|_| OnceLock::new()).collect(),
                duration: metrics.http_request_duration.with(&labels),
                request_bytes: metrics.http_request_bytes.with(&labels),
                response_bytes: metrics.http_response_bytes.with(&labels),
            }
        })
    }
}

impl MethodMetrics {
    fn requests(&self, status: StatusCode) -> &Counter {
        let index = usize::from(status.as_u16().saturating_sub(FIRST_STATUS)).min(STATUSES - 1);
        self.statuses[index].get_or_init(|| {
            larder()
                .http_requests
                .with(&[self.route, self.method, status.as_str()])
        })
    }
}

/// Adds `methods` under `path` with the metrics middleware around it.
pub trait MeteredRoutes<S> {
    fn metered_route(self, path: &'static str, methods: MethodRouter<S>) -> Self;
}

impl<S: Clone + Send + Sync + 'static> MeteredRoutes<S> for Router<S> {
    fn metered_route(self, path: &'static str, methods: MethodRouter<S>) -> Self {
        self.route(
            path,
            methods.layer(from_fn_with_state(RouteMetrics::new(path), record)),
        )
    }
}

/// The middleware: counts the request body as it is read, the status when
/// the response starts and the response body as it is sent, and observes
/// the duration when the response body is finished (or dropped).
pub async fn record(
    State(route): State<Arc<RouteMetrics>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let metrics = route.for_method(request.method());
    let request = if request.body().is_end_stream() {
        // No body (most GETs): nothing to count, nothing to wrap.
        request
    } else {
        request.map(|body| {
            Body::new(CountedBody {
                inner: body,
                bytes: metrics.request_bytes.clone(),
                finished: None,
            })
        })
    };
    let response = next.run(request).await;
    metrics.requests(response.status()).inc();
    response.map(|body| {
        Body::new(CountedBody {
            inner: body,
            bytes: metrics.response_bytes.clone(),
            finished: Some((started, metrics.duration.clone())),
        })
    })
}

/// A body that adds the length of each data frame to a counter and, if
/// given a start time, observes the time elapsed when it is dropped (after
/// its last frame, or when the client went away).
struct CountedBody {
    inner: Body,
    bytes: Counter,
    finished: Option<(Instant, Histogram)>,
}

impl HttpBody for CountedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes.inc_by(data.len() as u64);
            }
        }
        polled
    }

    // Forwarded, so that a body of known length keeps its Content-Length.
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

impl Drop for CountedBody {
    fn drop(&mut self) {
        if let Some((started, duration)) = self.finished.take() {
            duration.observe(started.elapsed().as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::routing::get;
    use tower::ServiceExt;

    #[tokio::test]
    async fn requests_are_counted_by_template_method_and_status() {
        let route = "/test-route/{name}";
        let app: Router = Router::new().metered_route(
            route,
            get(|| async { "four" }).put(|body: Bytes| async move { (StatusCode::CREATED, body) }),
        );
        let count = |method: &str, status: &str| {
            larder().http_requests.with(&[route, method, status]).get()
        };
        let response_bytes = larder().http_response_bytes.with(&[route, "PUT"]);
        let request_bytes = larder().http_request_bytes.with(&[route, "PUT"]);

        for path in ["/test-route/a", "/test-route/b"] {
            let response = app
                .clone()
                .oneshot(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let body = axum::body::to_bytes(response.into_body(), 100)
                .await
                .unwrap();
            assert_eq!(&body[..], b"four");
        }
        let response = app
            .clone()
            .oneshot(
                Request::put("/test-route/c")
                    .body(Body::from("hello"))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        axum::body::to_bytes(response.into_body(), 100)
            .await
            .unwrap();

        assert_eq!(count("GET", "200"), 2);
        assert_eq!(count("PUT", "201"), 1);
        assert_eq!(request_bytes.get(), 5);
        assert_eq!(response_bytes.get(), 5);
        let page = larder_service::metrics::render();
        for line in [
            "larder_http_requests_total{route=\"/test-route/{name}\",method=\"GET\",status=\"200\"} 2\n",
            "larder_http_request_duration_seconds_count{route=\"/test-route/{name}\",method=\"GET\"} 2\n",
        ] {
            assert!(page.contains(line), "{line} missing:\n{page}");
        }
    }
}
