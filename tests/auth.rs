//! Token checks of `lb backend` on `/ws`: refused tokens get a plain HTTP 401 and
//! no upgrade; valid tokens (header or query) get 101 and a welcome naming the
//! server and the user.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use lb::ws::token::{self, Claims, DEFAULT_SECRET};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};

const WAIT: Duration = Duration::from_secs(5);

/// One HTTP response read off a raw socket.
struct RawResponse {
    status_line: String,
    head: String,
    body: String,
}

/// Reads one HTTP/1.1 response (headers, then a Content-Length body).
async fn read_response(s: &mut TcpStream) -> RawResponse {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = timeout(WAIT, s.read(&mut chunk))
            .await
            .expect("response within 5 s")
            .unwrap();
        assert!(n > 0, "connection closed before a full response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = timeout(WAIT, s.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "connection closed inside the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    RawResponse {
        status_line: head.lines().next().unwrap_or_default().to_string(),
        body: String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string(),
        head,
    }
}

/// Sends a WebSocket upgrade request for `target` with `extra` header lines over a raw socket.
async fn raw_upgrade(addr: SocketAddr, target: &str, extra: &str) -> (TcpStream, RawResponse) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let resp = read_response(&mut s).await;
    (s, resp)
}

/// Asserts a 401 whose body says `why`, and that the socket still speaks plain HTTP.
async fn assert_refused(addr: SocketAddr, target: &str, extra: &str, why: &str) {
    let (mut s, resp) = raw_upgrade(addr, target, extra).await;
    assert!(
        resp.status_line.starts_with("HTTP/1.1 401"),
        "expected 401, got {:?}",
        resp.head
    );
    assert!(
        resp.body.contains(why),
        "body {:?} lacks {why:?}",
        resp.body
    );
    assert!(
        !resp
            .head
            .to_ascii_lowercase()
            .contains("sec-websocket-accept"),
        "a refused request must not be upgraded: {}",
        resp.head
    );
    // Same connection, next request: still HTTP, so no upgrade happened.
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let next = read_response(&mut s).await;
    assert!(
        next.status_line.starts_with("HTTP/1.1 200"),
        "{}",
        next.head
    );
    assert_eq!(next.body, "ok");
}

fn bearer(tok: &str) -> String {
    format!("Authorization: Bearer {tok}\r\n")
}

#[tokio::test]
async fn missing_token_is_401() {
    let (_b, addr) = support::spawn_backend("s1");
    assert_refused(addr, "/ws", "", "missing token").await;
    // An Authorization header of another scheme is no bearer token either.
    assert_refused(
        addr,
        "/ws",
        "Authorization: Basic YTpi\r\n",
        "missing token",
    )
    .await;
}

#[tokio::test]
async fn forged_token_is_401() {
    let (_b, addr) = support::spawn_backend("s1");
    let forged = token::issue("not-the-secret", "mallory", Duration::from_secs(3600));
    assert_refused(addr, "/ws", &bearer(&forged), "signature").await;
    assert_refused(addr, &format!("/ws?token={forged}"), "", "signature").await;
}

#[tokio::test]
async fn expired_token_is_401() {
    let (_b, addr) = support::spawn_backend("s1");
    let expired = token::issue_claims(
        DEFAULT_SECRET,
        &Claims {
            sub: "alice".into(),
            exp: token::now_unix() - 60,
        },
    )
    .unwrap();
    assert_refused(addr, "/ws", &bearer(&expired), "expired").await;
}

/// Signs arbitrary JSON claims with HS256, for claims `Claims` cannot express.
fn signed(secret: &str, claims: serde_json::Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &key,
    )
    .unwrap()
}

#[tokio::test]
async fn not_yet_valid_token_is_401() {
    let (_b, addr) = support::spawn_backend("s1");
    let now = token::now_unix();
    let early = signed(
        DEFAULT_SECRET,
        serde_json::json!({"sub": "alice", "exp": now + 3600, "nbf": now + 600}),
    );
    assert_refused(addr, "/ws", &bearer(&early), "not yet valid").await;
    assert_refused(addr, &format!("/ws?token={early}"), "", "not yet valid").await;
    // No leeway: a few seconds early is still early.
    let barely = signed(
        DEFAULT_SECRET,
        serde_json::json!({"sub": "alice", "exp": now + 3600, "nbf": now + 5}),
    );
    assert_refused(addr, "/ws", &bearer(&barely), "not yet valid").await;
    // A malformed nbf is refused, not ignored.
    let junk = signed(
        DEFAULT_SECRET,
        serde_json::json!({"sub": "alice", "exp": now + 3600, "nbf": "tomorrow"}),
    );
    assert_refused(addr, "/ws", &bearer(&junk), "malformed").await;
    // An nbf in the past is fine.
    let ripe = signed(
        DEFAULT_SECRET,
        serde_json::json!({"sub": "alice", "exp": now + 3600, "nbf": now - 10}),
    );
    let w = welcome(addr, "/ws", Some(&ripe)).await;
    assert_eq!(w["user"], "alice");
}

#[tokio::test]
async fn token_without_sub_or_exp_is_401() {
    let (_b, addr) = support::spawn_backend("s1");
    let exp = token::now_unix() + 3600;
    let no_sub = signed(DEFAULT_SECRET, serde_json::json!({"exp": exp}));
    assert_refused(addr, "/ws", &bearer(&no_sub), "sub").await;
    let empty_sub = signed(DEFAULT_SECRET, serde_json::json!({"sub": "", "exp": exp}));
    assert_refused(addr, "/ws", &bearer(&empty_sub), "sub").await;
    let no_exp = signed(DEFAULT_SECRET, serde_json::json!({"sub": "alice"}));
    assert_refused(addr, "/ws", &bearer(&no_exp), "exp").await;
}

#[tokio::test]
async fn malformed_token_is_401() {
    let (_b, addr) = support::spawn_backend("s1");
    assert_refused(addr, "/ws", &bearer("not.a.jwt"), "malformed").await;
}

#[tokio::test]
async fn secret_from_env_is_used() {
    let p = support::Proc::spawn(
        "s-env",
        &["backend", "--listen", "127.0.0.1:0", "--id", "s-env"],
        &[("LB_SECRET", "from-env")],
    );
    let line = p.wait_for_line(&["listening on"], WAIT);
    let addr: SocketAddr = line
        .rsplit("listening on ")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let default_signed = token::issue(DEFAULT_SECRET, "alice", Duration::from_secs(60));
    assert_refused(addr, "/ws", &bearer(&default_signed), "signature").await;
    let env_signed = token::issue("from-env", "alice", Duration::from_secs(60));
    let (_s, resp) = raw_upgrade(addr, "/ws", &bearer(&env_signed)).await;
    assert!(
        resp.status_line.starts_with("HTTP/1.1 101"),
        "{}",
        resp.head
    );
}

/// Completes a handshake with tungstenite and returns the first message as JSON.
async fn welcome(addr: SocketAddr, target: &str, auth: Option<&str>) -> serde_json::Value {
    let mut req = format!("ws://{addr}{target}")
        .into_client_request()
        .unwrap();
    if let Some(tok) = auth {
        req.headers_mut().insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {tok}")).unwrap(),
        );
    }
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut ws, resp) = timeout(WAIT, tokio_tungstenite::client_async(req, tcp))
        .await
        .unwrap()
        .expect("handshake");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let msg = timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    let Message::Text(text) = msg else {
        panic!("expected a text welcome, got {msg:?}")
    };
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn valid_header_token_gets_101_and_welcome() {
    let (_b, addr) = support::spawn_backend("s7");
    let tok = token::issue(DEFAULT_SECRET, "alice", Duration::from_secs(3600));
    let w = welcome(addr, "/ws", Some(&tok)).await;
    assert_eq!(w["type"], "welcome");
    assert_eq!(w["server"], "s7");
    assert_eq!(w["user"], "alice");
}

#[tokio::test]
async fn valid_query_token_gets_101_and_welcome() {
    let (_b, addr) = support::spawn_backend("s8");
    let tok = token::issue(DEFAULT_SECRET, "bob", Duration::from_secs(3600));
    let w = welcome(addr, &format!("/ws?token={tok}"), None).await;
    assert_eq!(w["server"], "s8");
    assert_eq!(w["user"], "bob");
    // The raw 101 carries the RFC 6455 accept value for the sample key.
    let (_s, resp) = raw_upgrade(addr, &format!("/ws?x=1&token={tok}"), "").await;
    assert!(
        resp.status_line.starts_with("HTTP/1.1 101"),
        "{}",
        resp.head
    );
    assert!(
        resp.head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{}",
        resp.head
    );
}

#[tokio::test]
async fn authenticated_but_not_an_upgrade_is_400_or_426() {
    let (_b, addr) = support::spawn_backend("s1");
    let tok = token::issue(DEFAULT_SECRET, "alice", Duration::from_secs(3600));
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /ws HTTP/1.1\r\nHost: x\r\n{}\r\n", bearer(&tok)).as_bytes())
        .await
        .unwrap();
    let resp = read_response(&mut s).await;
    assert!(
        resp.status_line.starts_with("HTTP/1.1 400"),
        "{}",
        resp.head
    );

    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{}\r\n",
        bearer(&tok)
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let resp = read_response(&mut s).await;
    assert!(
        resp.status_line.starts_with("HTTP/1.1 426"),
        "{}",
        resp.head
    );
    assert!(
        resp.head
            .to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{}",
        resp.head
    );
}
