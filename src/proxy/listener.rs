//! Listening and connected socket options, set through socket2.

use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};

/// Backlog asked of the kernel (capped by net.core.somaxconn). Large, so a reconnect
/// storm or a pause in accepting (fd limit) queues connections instead of refusing them.
const BACKLOG: i32 = 65_535;

/// Keepalive on both legs: finds a peer that vanished without a FIN or RST (a partition)
/// on a connection where nobody talks, within about idle + 3 x interval.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

/// Binds a listener with SO_REUSEADDR (restart while old connections sit in TIME_WAIT)
/// and a large backlog. IPv6 listeners are v6-only so a v4 service can share the port.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    let listener = TcpListener::from_std(socket.into())?;
    tune_listener(&listener);
    Ok(listener)
}

/// TCP_NODELAY (we forward what we get, never wait to coalesce) and keepalive.
pub fn tune_stream(stream: &TcpStream) {
    tune(SockRef::from(stream));
}

/// The same options on a listener: Linux copies them to every accepted socket, which
/// saves five setsockopt calls per client connection.
pub fn tune_listener(listener: &TcpListener) {
    tune(SockRef::from(listener));
}

fn tune(sock: SockRef<'_>) {
    let _ = sock.set_tcp_nodelay(true);
    let ka = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let _ = sock.set_tcp_keepalive(&ka);
}
