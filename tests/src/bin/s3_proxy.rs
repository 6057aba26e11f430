//! A small HTTP proxy in front of an S3 server for `ops/bench-s3.sh`: it
//! holds every request for a set delay before forwarding it (what a real
//! object store's round trip costs: ~25 ms inside a region, where Garage on
//! loopback answers in a fraction of a millisecond), and counts requests by
//! kind, so that the benchmark can report S3 requests per GiB pushed and
//! served and time to first byte in round trips.
//!
//! ```text
//! s3_proxy --listen ADDR --control ADDR --upstream http://HOST:PORT [--delay-ms N]
//! ```
//!
//! Requests and bodies pass through unchanged, streamed both ways (the
//! client signs requests for the upstream's host; S3 servers such as Garage
//! check the signature over the `Host` header the client sent, which this
//! proxy forwards as it came). The control listener answers `GET /counts`
//! with `KEY=VALUE` lines (`GET`, `GET_RANGE`, `LIST`, `HEAD`, `PUT`,
//! `PUT_PART`, `POST`, `DELETE`, `OTHER`, `TOTAL`, `DELAY_MS`), `POST
//! /reset` zeroes the counts, `PUT /delay/N` sets the delay to N ms
//! for requests that arrive from then on, and `PUT /stall/KIND/N` makes
//! the next N requests of that kind go unanswered: their bodies are read,
//! then nothing is sent until the client gives up (a service that hangs,
//! for the tests of request timeouts).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type Error = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// The kinds of request counted, in the order they are printed.
const KINDS: [&str; 9] = [
    "GET",
    "GET_RANGE",
    "LIST",
    "HEAD",
    "PUT",
    "PUT_PART",
    "POST",
    "DELETE",
    "OTHER",
];

struct Proxy {
    upstream: Uri,
    client: Client<HttpConnector, Incoming>,
    counts: [AtomicU64; KINDS.len()],
    /// Requests of each kind still to leave unanswered.
    stalls: [AtomicU64; KINDS.len()],
    delay_ms: AtomicU64,
}

impl Proxy {
    /// The index in [`KINDS`] of a request.
    fn kind(request: &Request<Incoming>) -> usize {
        let query = request.uri().query().unwrap_or("");
        let kind = match *request.method() {
            Method::GET if query.contains("list-type") || request.uri().path().ends_with('/') => {
                "LIST"
            }
            Method::GET if request.headers().contains_key(hyper::header::RANGE) => "GET_RANGE",
            Method::GET => "GET",
            Method::HEAD => "HEAD",
            Method::PUT if query.contains("partNumber") => "PUT_PART",
            Method::PUT => "PUT",
            Method::POST => "POST",
            Method::DELETE => "DELETE",
            _ => "OTHER",
        };
        KINDS
            .iter()
            .position(|known| *known == kind)
            .unwrap_or(KINDS.len() - 1)
    }

    async fn forward(&self, mut request: Request<Incoming>) -> Response<ProxyBody> {
        let kind = Self::kind(&request);
        self.counts[kind].fetch_add(1, Ordering::Relaxed);
        let stalled = self.stalls[kind]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(1)
            })
            .is_ok();
        if stalled {
            // The whole body is taken, so the client waits for an answer,
            // not to send; the future is dropped when it hangs up.
            let _ = request.into_body().collect().await;
            return std::future::pending().await;
        }
        let delay = self.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let path_and_query = request
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned());
        let uri = format!(
            "{}://{}{path_and_query}",
            self.upstream.scheme_str().unwrap_or("http"),
            self.upstream
                .authority()
                .map(|authority| authority.as_str())
                .unwrap_or_default()
        );
        match uri.parse() {
            Ok(uri) => *request.uri_mut() = uri,
            Err(error) => return text(StatusCode::BAD_REQUEST, format!("bad target: {error}\n")),
        }
        match self.client.request(request).await {
            Ok(response) => response.map(|body| body.boxed()),
            Err(error) => text(StatusCode::BAD_GATEWAY, format!("upstream: {error}\n")),
        }
    }

    fn control(&self, request: &Request<Incoming>) -> Response<ProxyBody> {
        let path = request.uri().path();
        match (request.method(), path) {
            (&Method::GET, "/counts") => {
                let mut out = String::new();
                let mut total = 0;
                for (kind, count) in KINDS.iter().zip(&self.counts) {
                    let count = count.load(Ordering::Relaxed);
                    total += count;
                    out.push_str(&format!("{kind}={count}\n"));
                }
                out.push_str(&format!("TOTAL={total}\n"));
                out.push_str(&format!(
                    "DELAY_MS={}\n",
                    self.delay_ms.load(Ordering::Relaxed)
                ));
                text(StatusCode::OK, out)
            }
            (&Method::POST, "/reset") => {
                for count in &self.counts {
                    count.store(0, Ordering::Relaxed);
                }
                text(StatusCode::OK, "reset\n".to_owned())
            }
            (&Method::PUT, _) if path.starts_with("/delay/") => {
                match path["/delay/".len()..].parse::<u64>() {
                    Ok(ms) => {
                        self.delay_ms.store(ms, Ordering::Relaxed);
                        text(StatusCode::OK, format!("delay {ms} ms\n"))
                    }
                    Err(error) => text(StatusCode::BAD_REQUEST, format!("bad delay: {error}\n")),
                }
            }
            (&Method::PUT, _) if path.starts_with("/stall/") => {
                let stall = path["/stall/".len()..]
                    .split_once('/')
                    .and_then(|(kind, n)| {
                        Some((
                            KINDS.iter().position(|known| *known == kind)?,
                            n.parse::<u64>().ok()?,
                        ))
                    });
                match stall {
                    Some((kind, n)) => {
                        self.stalls[kind].store(n, Ordering::Relaxed);
                        text(StatusCode::OK, format!("stalling {n} {}\n", KINDS[kind]))
                    }
                    None => text(
                        StatusCode::BAD_REQUEST,
                        format!("PUT /stall/KIND/N, KIND one of {KINDS:?}\n"),
                    ),
                }
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "GET /counts, POST /reset, PUT /delay/N, PUT /stall/KIND/N\n".to_owned(),
            ),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

/// Serves `listener` forever, each connection in its own task, with
/// `handle` answering each request.
async fn serve<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Response<ProxyBody>> + Send,
{
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("s3_proxy: accept: {error}");
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(handle(request).await) }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("s3_proxy: connection: {error}");
            }
        });
    }
}

fn argument(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|arg| arg == name)
        .and_then(|at| args.get(at + 1))
        .cloned()
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let usage =
        "usage: s3_proxy --listen ADDR --control ADDR --upstream http://HOST:PORT [--delay-ms N]";
    let listen: SocketAddr = argument(&args, "--listen").ok_or(usage)?.parse()?;
    let control: SocketAddr = argument(&args, "--control").ok_or(usage)?.parse()?;
    let upstream: Uri = argument(&args, "--upstream").ok_or(usage)?.parse()?;
    if upstream.scheme_str() != Some("http") || upstream.authority().is_none() {
        return Err(format!("--upstream must be http://HOST:PORT, not {upstream}").into());
    }
    let delay_ms = argument(&args, "--delay-ms")
        .map(|ms| ms.parse::<u64>())
        .transpose()?
        .unwrap_or(0);
    let proxy = Arc::new(Proxy {
        upstream,
        client: Client::builder(TokioExecutor::new()).build_http(),
        counts: Default::default(),
        stalls: Default::default(),
        delay_ms: AtomicU64::new(delay_ms),
    });
    let listener = TcpListener::bind(listen).await?;
    let control_listener = TcpListener::bind(control).await?;
    eprintln!(
        "s3_proxy: {listen} -> {}, control on {control}",
        proxy.upstream
    );
    let forwarding = {
        let proxy = proxy.clone();
        serve(listener, move |request| {
            let proxy = proxy.clone();
            async move { proxy.forward(request).await }
        })
    };
    let controlling = serve(control_listener, move |request| {
        let proxy = proxy.clone();
        async move { proxy.control(&request) }
    });
    tokio::join!(forwarding, controlling);
    Ok(())
}
