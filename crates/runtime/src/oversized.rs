//! Oversized and undecodable requests are the caller's fault, so they must read as
//! INVALID_ARGUMENT. tonic rejects a message over the decoding limit with OUT_OF_RANGE,
//! and bytes that are not a valid protobuf message with INTERNAL (the gRPC spec's code for
//! a parse error), before any handler runs; this response mapper (a layer on every
//! server) rewrites exactly those two statuses, recognised by tonic's messages, whether
//! they travel in the headers (trailers-only response) or in the trailers.

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
/// (tonic's code, tonic's message prefix, our message prefix) of each rewritten status.
const CALLER_FAULTS: [(tonic::Code, &str, &str); 2] = [
    (tonic::Code::OutOfRange, "Error, decoded message length too large: ", "request message too large: "),
    (tonic::Code::Internal, "failed to decode Protobuf message: ", "request message is not valid protobuf: "),
];

/// The response layer's function: rewrites the status in headers now and in trailers
/// when they arrive.
pub fn rewrite_oversized_status(mut response: Response<tonic::body::Body>) -> Response<tonic::body::Body> {
    rewrite_status(response.headers_mut());
    response.map(|body| tonic::body::Body::new(RewriteTrailers { inner: body }))
}

fn rewrite_status(headers: &mut HeaderMap) {
    let Some(&(_, tonic_prefix, our_prefix)) = CALLER_FAULTS.iter().find(|(code, _, _)| {
        headers.get("grpc-status").is_some_and(|status| status == HeaderValue::from(*code as i32))
    }) else {
        return;
    };
    // grpc-message is percent-encoded on the wire.
    let Some(detail) = headers
        .get("grpc-message")
        .and_then(|message| percent_decode(message.as_bytes()).decode_utf8().ok())
        .and_then(|message| message.strip_prefix(tonic_prefix).map(str::to_owned))
    else {
        return;
    };
    headers.insert("grpc-status", HeaderValue::from(tonic::Code::InvalidArgument as i32));
    let message = format!("{our_prefix}{detail}");
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
    fn undecodable_becomes_invalid_argument_with_the_reason() {
        let mut rewritten = headers(13, "failed%20to%20decode%20Protobuf%20message:%20invalid%20varint");
        rewrite_status(&mut rewritten);
        assert_eq!(rewritten["grpc-status"], "3");
        assert_eq!(rewritten["grpc-message"], "request%20message%20is%20not%20valid%20protobuf:%20invalid%20varint");
    }

    #[test]
    fn other_statuses_are_untouched() {
        let mut internal = headers(13, "ranking task failed");
        rewrite_status(&mut internal);
        assert_eq!(internal["grpc-status"], "13");
        let mut other = headers(11, "page past the end");
        rewrite_status(&mut other);
        assert_eq!(other["grpc-status"], "11");
        let mut empty = HeaderMap::new();
        rewrite_status(&mut empty);
        assert!(empty.is_empty());
    }
}
