//! A one-shot HTTP/1.1 `GET` over a fresh connection (hyper), for health checks and the
//! demo's look at backends. No pooling on purpose: a check must prove that a *new*
//! connection is served, as a reconnecting client's would be.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a GET did not produce a response.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("http error: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("response body over {0} bytes")]
    TooLarge(usize),
}

/// GETs `path` from `addr`; returns the status and at most `limit` bytes of body.
/// Callers bound it with a timeout.
pub async fn get(addr: SocketAddr, path: &str, limit: usize) -> Result<(u16, Bytes), GetError> {
    let stream = TcpStream::connect(addr).await.map_err(GetError::Connect)?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(
            hyper::header::USER_AGENT,
            concat!("lb/", env!("CARGO_PKG_VERSION")),
        )
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    // hyper needs the connection future polled while the request is in flight.
    let exchange = async {
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        // Read the body so the server sees an orderly close, not a reset.
        let body = Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|_| GetError::TooLarge(limit))?
            .to_bytes();
        Ok::<_, GetError>((status, body))
    };
    tokio::pin!(conn, exchange);
    tokio::select! {
        biased;
        r = &mut exchange => r,
        // The connection can finish first (`Connection: close`) with the response already
        // buffered: let the exchange take it, or fail with hyper's own reason.
        r = &mut conn => {
            r?;
            exchange.await
        }
    }
}
