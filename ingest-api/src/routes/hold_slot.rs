//! The middleware that holds a NAR upload's slots (`upload_slots`): the
//! routes that receive a NAR take a slot before their handler runs,
//! and before a byte of the body is read, so that a refusal costs the
//! client nothing to retry:
//!
//! - `PUT /_api/v1/upload-path` is refused at once with 429,
//!   `Retry-After` and the usual JSON error naming the limit; `larder
//!   push` and the agent wait and retry.
//! - `PUT /{cache}/nar/…` (Nix) first waits up to `upload-slot-wait` for
//!   slots, without reading its body, and is refused only then. Nix 2.8
//!   retries a 429 only four times within about five seconds and never
//!   rewinds its upload buffer (a retried PUT goes out without the bytes
//!   the first attempt sent). curl sends `Expect: 100-continue` and holds
//!   the body back for up to a second, until the `100 Continue` hyper
//!   sends when the handler first reads the body: a 429 within that second
//!   leaves the retry whole (`upload-slot-wait = 0` does that, and Nix 2.8
//!   then gives up after five seconds at the limit), while waiting lets it
//!   through a limit held for minutes. A wait costs a task and the
//!   connection, no thread and no buffered body: what curl sends meanwhile
//!   stays in the socket. Current Nix rewinds, and retries a 429 after a
//!   minute.
//!
//! The slot is released when the body has been read to its end, fails, or
//! is dropped: waiting for a path to become visible holds none. Callers
//! without a valid token take no slot; their handler refuses them.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{FromRequestParts, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};

use crate::access::Caller;
use crate::state::AppState;
use crate::upload_slots::UploadSlot;

/// What a route does when no slot is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenBusy {
    /// Answer 429 at once (clients that retry).
    Refuse,
    /// Wait up to `upload-slot-wait` without reading the body, then 429
    /// (Nix's own upload protocol).
    Wait,
}

/// The middleware of the routes that receive a NAR (see the module
/// documentation): takes the caller's slots, then runs the handler with
/// a body that gives them back when it ends.
pub async fn hold_slot(
    State((state, when_busy)): State<(AppState, WhenBusy)>,
    request: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    // The handler authenticates again and answers a missing or invalid
    // token itself; only a token's own uploads are counted.
    let jti = match Caller::from_request_parts(&mut parts, &state).await {
        Ok(caller) => caller.claims().map(|claims| claims.jti.clone()),
        Err(_) => None,
    };
    let Some(jti) = jti else {
        return next.run(Request::from_parts(parts, body)).await;
    };
    let wait = match when_busy {
        WhenBusy::Refuse => Duration::ZERO,
        WhenBusy::Wait => state.upload_slots.wait(),
    };
    match state.upload_slots.acquire(&jti, wait).await {
        Ok(slot) => {
            let body = Body::new(SlotBody {
                inner: body,
                slot: Some(slot),
            });
            next.run(Request::from_parts(parts, body)).await
        }
        Err(refusal) => refusal.into_response(),
    }
}

/// A request body holding its upload's slot until it ends.
struct SlotBody {
    inner: Body,
    slot: Option<UploadSlot>,
}

impl HttpBody for SlotBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.slot = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
