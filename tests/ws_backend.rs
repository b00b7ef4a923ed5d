//! `lb backend` as a WebSocket server, driven by raw sockets (hand-made frames)
//! and by tungstenite clients: health, pong latency, echo, size limit with close
//! 1009 (whole and fragmented), presence in `/users`, idle timeout.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use lb::ws::token::{self, DEFAULT_SECRET};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const WAIT: Duration = Duration::from_secs(5);
const KIB: usize = 1024;

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

fn tok(user: &str) -> String {
    token::issue(DEFAULT_SECRET, user, Duration::from_secs(3600))
}

// ---------- raw client: hand-written handshake and frames ----------

/// A raw TCP connection upgraded by hand; `buf` holds bytes read past the last frame.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Connects and completes the upgrade by hand, leaving any early frame bytes in `buf`.
    async fn connect(addr: SocketAddr, user: &str) -> Raw {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Authorization: Bearer {}\r\n\r\n",
            tok(user)
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Raw { s, buf: Vec::new() };
        let end = loop {
            if let Some(i) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            raw.fill().await;
        };
        let head = String::from_utf8_lossy(&raw.buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        raw.buf.drain(..end);
        raw
    }

    /// Reads more bytes into `buf`; panics on EOF or after 5 s.
    async fn fill(&mut self) {
        let mut chunk = [0u8; 64 * 1024];
        let n = timeout(WAIT, self.s.read(&mut chunk))
            .await
            .expect("data within 5 s")
            .expect("read");
        assert!(n > 0, "unexpected EOF");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Sends one masked frame (clients must mask).
    async fn send(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let len = payload.len();
        if len < 126 {
            f.push(0x80 | len as u8);
        } else if len <= u16::MAX as usize {
            f.push(0x80 | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let mask = [0x12, 0x34, 0x56, 0x78];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.s.write_all(&f).await.unwrap();
    }

    /// Reads one (unmasked, server) frame.
    async fn recv(&mut self) -> Frame {
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return frame;
            }
            self.fill().await;
        }
    }
}

/// One received frame: (fin, opcode, payload).
type Frame = (bool, u8, Vec<u8>);

/// Parses one server frame from the front of `b`, if complete; returns it and its length.
fn parse_frame(b: &[u8]) -> Option<(Frame, usize)> {
    if b.len() < 2 {
        return None;
    }
    let fin = b[0] & 0x80 != 0;
    let opcode = b[0] & 0x0F;
    assert_eq!(b[1] & 0x80, 0, "server frames must not be masked");
    let (len, mut at) = match b[1] & 0x7F {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (
            u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    if b.len() < at + len {
        return None;
    }
    let payload = b[at..at + len].to_vec();
    at += len;
    Some(((fin, opcode, payload), at))
}

/// Reads frames until a close frame; returns its status code.
async fn raw_close_code(raw: &mut Raw) -> u16 {
    loop {
        let (_, op, payload) = raw.recv().await;
        if op == OP_CLOSE {
            assert!(payload.len() >= 2, "close frame without a code");
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

// ---------- tungstenite client ----------

type Client = WebSocketStream<TcpStream>;

/// Connects with tungstenite and consumes the welcome.
async fn ws_connect(addr: SocketAddr, user: &str) -> Client {
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut().insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {}", tok(user))).unwrap(),
    );
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) = timeout(WAIT, tokio_tungstenite::client_async(req, tcp))
        .await
        .unwrap()
        .unwrap();
    let first = timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert!(first.is_text(), "welcome first, got {first:?}");
    ws
}

/// Next message, which must arrive within 5 s.
async fn next(ws: &mut Client) -> Message {
    timeout(WAIT, ws.next())
        .await
        .expect("message within 5 s")
        .expect("stream open")
        .expect("no error")
}

/// Simple `GET path` over a fresh connection; returns (status code, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (code, _head, body) = http_request(addr, "GET", path).await;
    (code, body)
}

/// `METHOD path` over a fresh connection closed by the server after the response;
/// returns (status code, head, everything after the head).
async fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let text = exchange(addr, request.as_bytes()).await;
    let code = text[9..12].parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (code, head.to_string(), body.to_string())
}

/// Writes `request` on a fresh connection and reads until the server closes it.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    timeout(WAIT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).to_string()
}

/// Value of header `name` in a response head, if present.
fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn users(addr: SocketAddr) -> serde_json::Map<String, serde_json::Value> {
    let (code, body) = http_get(addr, "/users").await;
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

// ---------- tests ----------

#[tokio::test]
async fn healthz_and_unknown_path() {
    let (_b, addr) = support::spawn_backend("s1");
    assert_eq!(http_get(addr, "/healthz").await, (200, "ok".to_string()));
    assert_eq!(http_get(addr, "/nope").await.0, 404);
}

#[tokio::test]
async fn head_healthz_and_users_answer_200_without_body() {
    let (_b, addr) = support::spawn_backend("s1");
    let (code, head, body) = http_request(addr, "HEAD", "/healthz").await;
    assert_eq!(code, 200, "{head}");
    assert_eq!(body, "", "HEAD must not carry a body");
    let (code, head, body) = http_request(addr, "HEAD", "/users").await;
    assert_eq!(code, 200, "{head}");
    assert_eq!(body, "", "HEAD must not carry a body");
    assert_eq!(
        header_value(&head, "content-type"),
        Some("application/json")
    );
    // Other methods are still refused, and the refusal lists what is allowed.
    let (code, head, _) = http_request(addr, "POST", "/healthz").await;
    assert_eq!(code, 405, "{head}");
    assert_eq!(header_value(&head, "allow"), Some("GET, HEAD"));
    let (code, head, _) = http_request(addr, "HEAD", "/ws").await;
    assert_eq!(code, 405, "{head}");
    assert_eq!(header_value(&head, "allow"), Some("GET"));
    assert_eq!(http_request(addr, "HEAD", "/nope").await.0, 404);
}

#[tokio::test]
async fn head_then_get_on_one_keep_alive_connection() {
    // A monitor that keeps its connection open: if a HEAD answer leaked body bytes,
    // they would be read as the start of the next response.
    let (_b, addr) = support::spawn_backend("s1");
    let text = exchange(
        addr,
        b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (first, rest) = text.split_once("\r\n\r\n").unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        rest.starts_with("HTTP/1.1 200"),
        "HEAD leaked a body: {text:?}"
    );
    assert_eq!(rest.split_once("\r\n\r\n").unwrap().1, "ok", "{text:?}");
}

#[tokio::test]
async fn ping_gets_prompt_pong_with_same_payload() {
    let (_b, addr) = support::spawn_backend("s1");
    let mut raw = Raw::connect(addr, "pinger").await;
    let (_, op, welcome) = raw.recv().await;
    assert_eq!(op, OP_TEXT);
    assert!(String::from_utf8_lossy(&welcome).contains("welcome"));
    // The server has nothing else to send: the pong must still go out by itself.
    for i in 0..3u8 {
        let payload = [b'h', b'b', i];
        let sent = Instant::now();
        raw.send(true, OP_PING, &payload).await;
        let (fin, op, got) = raw.recv().await;
        let took = sent.elapsed();
        assert!(fin);
        assert_eq!(op, OP_PONG);
        assert_eq!(got, payload);
        assert!(took < Duration::from_secs(1), "pong took {took:?}");
    }
}

#[tokio::test]
async fn echoes_text_and_binary() {
    let (_b, addr) = support::spawn_backend("s1");
    let mut ws = ws_connect(addr, "echo").await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("hello"));
    let blob: Vec<u8> = (0..60 * KIB).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::binary(blob));
}

#[tokio::test]
async fn fragmented_message_under_limit_is_reassembled_and_echoed() {
    let (_b, addr) = support::spawn_backend("s1");
    let mut raw = Raw::connect(addr, "frag").await;
    raw.recv().await; // welcome
    let part = vec![b'x'; 16 * KIB];
    raw.send(false, OP_TEXT, &part).await;
    raw.send(false, OP_CONT, &part).await;
    raw.send(true, OP_CONT, &part).await;
    let (fin, op, got) = raw.recv().await;
    assert!(fin);
    assert_eq!(op, OP_TEXT);
    assert_eq!(got.len(), 48 * KIB);
}

#[tokio::test]
async fn oversized_message_gets_close_1009() {
    let (_b, addr) = support::spawn_backend("s1");
    let mut ws = ws_connect(addr, "big").await;
    ws.send(Message::binary(vec![7u8; 70 * KIB])).await.unwrap();
    loop {
        match next(&mut ws).await {
            Message::Close(Some(frame)) => {
                assert_eq!(frame.code, CloseCode::Size);
                break;
            }
            Message::Close(None) => panic!("close without the 1009 code"),
            _ => {}
        }
    }
    // The server ends the connection afterwards.
    let end = timeout(WAIT, ws.next()).await.expect("connection ends");
    assert!(!matches!(
        end,
        Some(Ok(Message::Text(_) | Message::Binary(_)))
    ));
}

#[tokio::test]
async fn client_still_sending_a_huge_message_gets_to_read_1009() {
    // The server refuses at the frame header while megabytes are still in flight;
    // it must drain them rather than reset the connection under the client's write.
    let (_b, addr) = support::spawn_backend("s1");
    let mut ws = ws_connect(addr, "huge").await;
    timeout(WAIT, ws.send(Message::binary(vec![3u8; 4096 * KIB])))
        .await
        .expect("send completes")
        .expect("send must not be reset");
    loop {
        if let Message::Close(frame) = next(&mut ws).await {
            assert_eq!(frame.map(|f| f.code), Some(CloseCode::Size));
            break;
        }
    }
}

#[tokio::test]
async fn oversized_message_on_the_wire_is_close_1009_raw() {
    let (_b, addr) = support::spawn_backend("s1");
    let mut raw = Raw::connect(addr, "big-raw").await;
    raw.recv().await; // welcome
    raw.send(true, OP_BINARY, &vec![1u8; 70 * KIB]).await;
    assert_eq!(raw_close_code(&mut raw).await, 1009);
}

#[tokio::test]
async fn oversized_fragmented_message_gets_close_1009() {
    let (_b, addr) = support::spawn_backend("s1");
    let mut raw = Raw::connect(addr, "frag-big").await;
    raw.recv().await; // welcome
    // 70 KiB in 16 KiB fragments: every frame is small, only the sum is too big.
    let total = 70 * KIB;
    let data = vec![b'y'; total];
    let chunks: Vec<&[u8]> = data.chunks(16 * KIB).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let op = if i == 0 { OP_TEXT } else { OP_CONT };
        raw.send(i == chunks.len() - 1, op, chunk).await;
    }
    assert_eq!(raw_close_code(&mut raw).await, 1009);
}

#[tokio::test]
async fn users_lists_connected_user_until_close() {
    let (_b, addr) = support::spawn_backend("s4");
    assert!(users(addr).await.is_empty());
    let mut ws = ws_connect(addr, "alice").await;
    let listed = users(addr).await;
    assert_eq!(listed.get("alice").and_then(|v| v.as_str()), Some("s4"));
    ws.close(None).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while users(addr).await.contains_key("alice") {
        assert!(Instant::now() < deadline, "alice still listed after close");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn silent_client_is_dropped_after_client_timeout() {
    let (_b, addr) = support::spawn_backend_with("s1", &["--client-timeout", "1s"]);
    let started = Instant::now();
    let mut quiet = ws_connect(addr, "quiet").await;
    let mut chatty = ws_connect(addr, "chatty").await;
    // `chatty` pings every 300 ms and must outlive `quiet`.
    let keepalive = tokio::spawn(async move {
        for _ in 0..8 {
            chatty
                .send(Message::Ping(b"k".to_vec().into()))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            // Read the pong so the stream keeps flowing.
            let _ = timeout(Duration::from_millis(50), chatty.next()).await;
        }
        chatty
    });
    match next(&mut quiet).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected close 1001, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "dropped after {took:?}"
    );
    let mut chatty = keepalive.await.unwrap();
    assert!(started.elapsed() > Duration::from_millis(2000));
    chatty.send(Message::text("still here")).await.unwrap();
    loop {
        match next(&mut chatty).await {
            Message::Text(t) => {
                assert_eq!(t.as_str(), "still here");
                break;
            }
            Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn sigterm_closes_sessions_with_1001_and_exits_cleanly() {
    let (mut b, addr) = support::spawn_backend("s1");
    let mut ws = ws_connect(addr, "leaving").await;
    b.signal(libc::SIGTERM);
    match next(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected close 1001, got {other:?}"),
    }
    assert_eq!(b.wait_exit(WAIT), Some(0));
}
