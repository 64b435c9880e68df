//! Oversized requests are the caller's fault, so they must read as INVALID_ARGUMENT.
//! tonic rejects a message over the decoding limit with OUT_OF_RANGE before any handler
//! runs; this response mapper (a layer on every server) rewrites exactly that status,
//! whether it travels in the headers (trailers-only response) or in the trailers.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use percent_encoding::{percent_decode, utf8_percent_encode, AsciiSet, CONTROLS};
use tonic::codegen::http::{HeaderMap, HeaderValue, Response};

/// Characters the gRPC spec percent-encodes in grpc-message (tonic's set).
const GRPC_MESSAGE: &AsciiSet =
    &CONTROLS.add(b' ').add(b'"').add(b'#').add(b'<').add(b'>').add(b'`').add(b'?').add(b'{').add(b'}').add(b'%');
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large: ";

/// The response layer's function: rewrites the status in headers now and in trailers
/// when they arrive.
pub fn rewrite_oversized_status(mut response: Response<tonic::body::Body>) -> Response<tonic::body::Body> {
    rewrite_status(response.headers_mut());
    response.map(|body| tonic::body::Body::new(RewriteTrailers { inner: body }))
}

fn rewrite_status(headers: &mut HeaderMap) {
    let is_out_of_range =
        headers.get("grpc-status").is_some_and(|status| status == HeaderValue::from(tonic::Code::OutOfRange as i32));
    if !is_out_of_range {
        return;
    }
    // grpc-message is percent-encoded on the wire.
    let Some(detail) = headers
        .get("grpc-message")
        .and_then(|message| percent_decode(message.as_bytes()).decode_utf8().ok())
        .and_then(|message| message.strip_prefix(TONIC_TOO_LARGE).map(str::to_owned))
    else {
        return;
    };
    headers.insert("grpc-status", HeaderValue::from(tonic::Code::InvalidArgument as i32));
    let message = format!("request message too large: {detail}");
    if let Ok(encoded) = HeaderValue::from_str(&utf8_percent_encode(&message, GRPC_MESSAGE).to_string()) {
        headers.insert("grpc-message", encoded);
    }
}

struct RewriteTrailers {
    inner: tonic::body::Body,
}

impl HttpBody for RewriteTrailers {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(match frame.into_trailers() {
                Ok(mut trailers) => {
                    rewrite_status(&mut trailers);
                    Frame::trailers(trailers)
                }
                Err(frame) => frame,
            }))),
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(status: i32, message: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", HeaderValue::from(status));
        headers.insert("grpc-message", HeaderValue::from_str(message).unwrap());
        headers
    }

    #[test]
    fn too_large_becomes_invalid_argument_with_the_sizes() {
        let mut rewritten = headers(
            11,
            "Error,%20decoded%20message%20length%20too%20large:%20found%205000000%20bytes,%20the%20limit%20is:%204194304%20bytes",
        );
        rewrite_status(&mut rewritten);
        assert_eq!(rewritten["grpc-status"], "3");
        assert_eq!(
            rewritten["grpc-message"],
            "request%20message%20too%20large:%20found%205000000%20bytes,%20the%20limit%20is:%204194304%20bytes"
        );
    }

    #[test]
    fn other_statuses_are_untouched() {
        let mut other = headers(11, "page past the end");
        rewrite_status(&mut other);
        assert_eq!(other["grpc-status"], "11");
        let mut empty = HeaderMap::new();
        rewrite_status(&mut empty);
        assert!(empty.is_empty());
    }
}
