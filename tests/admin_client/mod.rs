//! A tiny HTTP/1.1 client for the admin API tests (std sockets, one request per
//! connection, `Connection: close`, read to EOF), a Prometheus text reader, and a
//! minimal WebSocket client that holds a connection open through lb.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A response: status, lower-cased headers, body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends `METHOD path` with `headers` (`"Name: value"`) and returns the response.
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n");
    if method == "POST" {
        req.push_str("Content-Length: 0\r\n");
    }
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

pub fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, &[])
}

pub fn post(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "POST", path, &[])
}

/// `GET /backends`, the backend `name` of service `service` in it.
pub fn backend(admin: SocketAddr, service: &str, name: &str) -> serde_json::Value {
    let doc = get(admin, "/backends").json();
    doc["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| s["name"] == service)
        .and_then(|s| {
            s["backends"]
                .as_array()
                .expect("backends")
                .iter()
                .find(|b| b["name"] == name)
                .cloned()
        })
        .unwrap_or_else(|| panic!("no backend {service}/{name} in {doc:#}"))
}

/// The value of the sample `name{labels}` (labels exactly as exposed, e.g.
/// `service="svc",backend="s1"`; empty for none) in a Prometheus text exposition.
pub fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map(|v| v.trim().parse().expect("a number"))
}

/// A WebSocket held open through lb (the bundled backend: welcome, then echo).
pub struct Ws {
    pub stream: TcpStream,
    /// The server id from the welcome message.
    pub server: String,
}

impl Ws {
    /// Opens `/ws` through `lb` with a valid token and reads the welcome message.
    pub fn open(lb: SocketAddr) -> Ws {
        let token = lb::ws::token::issue(
            lb::ws::token::DEFAULT_SECRET,
            "held",
            Duration::from_secs(600),
        );
        let mut stream = TcpStream::connect(lb).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: lb\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("\"user\"") {
            let n = stream.read(&mut buf).expect("welcome");
            assert!(n > 0, "closed before the welcome message");
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 101"), "handshake: {text}");
        let at = text.find("\"server\":\"").expect("server id") + "\"server\":\"".len();
        let server = text[at..].split('"').next().unwrap().to_string();
        Ws { stream, server }
    }

    /// Sends `msg` as a text frame and returns the echo; Err if the connection is gone.
    pub fn echo(&mut self, msg: &str) -> std::io::Result<String> {
        assert!(msg.len() < 126, "short messages only");
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        let mut frame = vec![0x81, 0x80 | msg.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(msg.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame)?;
        let mut head = [0u8; 2];
        self.stream.read_exact(&mut head)?;
        let mut payload = vec![0u8; usize::from(head[1] & 0x7f)];
        self.stream.read_exact(&mut payload)?;
        Ok(String::from_utf8_lossy(&payload).into_owned())
    }

    /// True once the peer has closed or reset the connection (waits up to `timeout`).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                // A close frame may come first; keep reading until EOF.
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return false;
                }
                Err(_) => return true,
            }
        }
    }
}
