//! systemd integration: readiness and state notifications (`sd_notify`), the watchdog,
//! and socket activation (`LISTEN_FDS`). Outside systemd all of it is a no-op: without
//! `NOTIFY_SOCKET` nothing is sent, without `LISTEN_FDS`/`LISTEN_PID` for this process
//! nothing is adopted and every service binds its own address.
//!
//! The protocol itself comes from the `sd-notify` crate; this module decides what to
//! say when, and how passed sockets map to services.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use socket2::{Socket, Type};
use tokio::sync::broadcast;

/// The `STATUS=` text for a backend count, e.g. `3/3 backends up`.
pub fn backends_status(healthy: usize, total: usize) -> String {
    format!("{healthy}/{total} backends up")
}

/// True when a service manager listens for notifications (`NOTIFY_SOCKET` is set).
pub fn notify_enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// `READY=1` with a `STATUS=` line: start-up (or a reload) is complete.
pub fn ready(status: &str) {
    send(
        "READY=1",
        &[NotifyState::Ready, NotifyState::Status(status)],
    );
}

/// `RELOADING=1` with `MONOTONIC_USEC=` (newer systemd rejects a reload notification
/// without the timestamp); follow it with [`ready`] once the new config is in force.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    match NotifyState::monotonic_usec_now() {
        Ok(now) => states.push(now),
        Err(e) => tracing::warn!("sd_notify: cannot read CLOCK_MONOTONIC: {e}"),
    }
    send("RELOADING=1", &states);
}

/// `STOPPING=1`: shutdown has begun (systemd shows "deactivating" while lb drains).
pub fn stopping() {
    send(
        "STOPPING=1",
        &[NotifyState::Stopping, NotifyState::Status("draining")],
    );
}

/// `STATUS=` only (shown by `systemctl status lb`).
pub fn status(text: &str) {
    send("STATUS", &[NotifyState::Status(text)]);
}

/// `STATUS=<healthy>/<total> backends up`.
pub fn status_backends(healthy: usize, total: usize) {
    status(&backends_status(healthy, total));
}

/// Keeps `STATUS=` current: on every message from `events` (health transitions), sends
/// the counts `counts()` returns. Never resolves, so it can stand in a `select!` beside
/// the shutdown future; without `NOTIFY_SOCKET` it just waits.
pub async fn follow_backends<T: Clone>(
    mut events: broadcast::Receiver<T>,
    counts: impl Fn() -> (usize, usize),
) {
    if !notify_enabled() {
        return std::future::pending().await;
    }
    loop {
        match events.recv().await {
            // After a lag the counts are read fresh anyway, so nothing is lost.
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                let (healthy, total) = counts();
                status_backends(healthy, total);
            }
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}

/// Starts the watchdog task when systemd asked for one (`WATCHDOG_USEC` set, and
/// `WATCHDOG_PID` unset or ours): `WATCHDOG=1` every half of `WATCHDOG_USEC`.
///
/// The ping is sent from a task on the async runtime, on a tokio timer, so it stops when
/// the runtime stops making progress (every worker blocked or spinning): then systemd
/// kills and restarts lb. A plain thread would keep pinging for a dead balancer.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    if !notify_enabled() {
        return None;
    }
    let timeout = sd_notify::watchdog_enabled()?;
    let every = (timeout / 2).max(Duration::from_millis(1));
    tracing::info!(
        "systemd watchdog: {} ms, pinging every {} ms",
        timeout.as_millis(),
        every.as_millis()
    );
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        // After a stall, ping once and keep the rhythm; a burst of late pings says nothing.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            send("WATCHDOG=1", &[NotifyState::Watchdog]);
        }
    }))
}

/// Sends one notification; a failure is logged (once per kind for the frequent ones)
/// and otherwise ignored: lb keeps serving whatever the service manager thinks.
fn send(what: &str, states: &[NotifyState]) {
    static WATCHDOG_FAILED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = sd_notify::notify(states) {
        let repeat = matches!(states, [NotifyState::Watchdog]);
        if !repeat || !WATCHDOG_FAILED.swap(true, Ordering::Relaxed) {
            tracing::warn!("sd_notify {what} failed: {e}");
        }
    }
}

/// A passed socket lb cannot use, or an unusable activation environment.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("invalid LISTEN_FDS/LISTEN_FDNAMES, ignoring passed sockets: {0}")]
    Env(#[source] std::io::Error),
    #[error("fd {fd} ({name:?}) is not a listening TCP socket: {reason}")]
    NotTcpListener {
        fd: RawFd,
        name: String,
        reason: String,
    },
    #[error("fd {fd} ({name:?}): {source}")]
    Io {
        fd: RawFd,
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// A listening socket passed by the service manager.
struct Passed {
    fd: RawFd,
    name: String,
    addr: SocketAddr,
    socket: Socket,
}

/// Set once the passed descriptors have been taken: they belong to whoever took them, so a
/// second call (a reload binding listeners again) must not wrap the same fds again.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Socket activation: the listeners systemd passed (`LISTEN_FDS`, for this process per
/// `LISTEN_PID`), matched to `services` (`(name, listen)` in config order). Returns one
/// entry per service: `Some` for an adopted listener, `None` where the caller binds the
/// address itself.
///
/// Matching: a socket whose `FileDescriptorName=` (`LISTEN_FDNAMES`) is a service's name
/// goes to that service (if several share the name, the one on the service's `listen`
/// address wins); a socket named `unknown` (no names passed) or with a name no service has
/// (systemd's default is the socket unit's name) goes to the service whose `listen` equals
/// its local address. A service left without a socket, while sockets were passed, is
/// logged as a warning (it binds its own address, as without systemd); a socket left
/// without a service is logged and closed.
///
/// Only the first call takes the descriptors; later ones return all `None`. Must run
/// inside the tokio runtime (the listeners are registered with its reactor).
pub fn adopt_listeners<'a>(
    services: impl IntoIterator<Item = (&'a str, SocketAddr)>,
) -> Vec<Option<tokio::net::TcpListener>> {
    let services: Vec<(&str, SocketAddr)> = services.into_iter().collect();
    let mut out: Vec<Option<tokio::net::TcpListener>> = services.iter().map(|_| None).collect();
    if TAKEN.swap(true, Ordering::SeqCst) {
        return out;
    }
    let passed = match take_passed() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("socket activation: {e}");
            return out;
        }
    };
    let Some(passed) = passed else {
        return out;
    };
    let count = passed.len();
    let sockets: Vec<Passed> = passed
        .into_iter()
        .filter_map(|(fd, name)| match inspect(fd, name) {
            Ok(p) => Some(p),
            Err(e) => {
                // The Socket was dropped inside inspect(), which closed the fd.
                tracing::warn!("socket activation: {e}: closing it");
                None
            }
        })
        .collect();
    let keys: Vec<(&str, SocketAddr)> = sockets.iter().map(|p| (p.name.as_str(), p.addr)).collect();
    let plan = plan(&services, &keys);

    let mut sockets: Vec<Option<Passed>> = sockets.into_iter().map(Some).collect();
    for (i, (service, listen)) in services.iter().enumerate() {
        let Some((j, how)) = plan.for_service[i] else {
            tracing::warn!(
                service,
                %listen,
                "socket activation: no socket passed for service {service:?} \
                 (FileDescriptorName={service} in a socket unit with Service=lb.service); \
                 binding {listen} itself"
            );
            continue;
        };
        let p = sockets[j].take().expect("a socket is assigned once");
        match how {
            How::Name if p.addr == *listen => tracing::info!(
                service,
                listen = %p.addr,
                fd = p.fd,
                "socket activation: using the socket passed for {service:?}"
            ),
            How::Name => tracing::warn!(
                service,
                listen = %p.addr,
                config_listen = %listen,
                fd = p.fd,
                "socket activation: the socket passed for {service:?} listens on {}, \
                 not on {listen} as the config says; using the passed socket",
                p.addr
            ),
            How::Address if p.name == "unknown" || p.name.is_empty() => tracing::info!(
                service,
                listen = %p.addr,
                fd = p.fd,
                "socket activation: using the unnamed socket on {} for {service:?} (matched by address)",
                p.addr
            ),
            How::Address => tracing::warn!(
                service,
                listen = %p.addr,
                fd = p.fd,
                fdname = p.name,
                "socket activation: socket named {:?} matches no service; using it for \
                 {service:?}, which listens on the same address (set FileDescriptorName={service})",
                p.name
            ),
        }
        out[i] = into_tokio(p);
    }
    for p in sockets.into_iter().flatten() {
        tracing::warn!(
            fd = p.fd,
            fdname = p.name,
            listen = %p.addr,
            "socket activation: passed socket {:?} on {} matches no service in the config \
             (by name or address): closing it",
            p.name,
            p.addr
        );
    }
    tracing::debug!(passed = count, "socket activation done");
    out
}

/// The passed descriptors with their names, or `None` when none were passed to us.
fn take_passed() -> Result<Option<Vec<(RawFd, String)>>, ActivationError> {
    // listen_fds() checks LISTEN_PID against our pid and sets FD_CLOEXEC. The variables
    // stay set (unsetting them is unsound once threads run); lb spawns no children that
    // could inherit them, and LISTEN_PID would not match theirs anyway.
    let passed: Vec<(RawFd, String)> = sd_notify::listen_fds_with_names()
        .map_err(ActivationError::Env)?
        .collect();
    if passed.is_empty() {
        return Ok(None);
    }
    tracing::info!(
        count = passed.len(),
        names = %passed.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>().join(":"),
        "socket activation: {} socket(s) passed by the service manager",
        passed.len()
    );
    Ok(Some(passed))
}

/// Takes ownership of a passed descriptor and checks it is a listening TCP socket.
fn inspect(fd: RawFd, name: String) -> Result<Passed, ActivationError> {
    // SAFETY: the service manager passed this descriptor to this process (LISTEN_PID is
    // ours) and TAKEN makes sure it is wrapped once; from here the Socket owns it.
    let socket = unsafe { Socket::from_raw_fd(fd) };
    let io = |source| ActivationError::Io {
        fd,
        name: name.clone(),
        source,
    };
    let bad = |reason: &str| ActivationError::NotTcpListener {
        fd,
        name: name.clone(),
        reason: reason.to_string(),
    };
    if socket.r#type().map_err(io)? != Type::STREAM {
        return Err(bad("not a stream socket"));
    }
    if !socket.is_listener().map_err(io)? {
        return Err(bad("not listening"));
    }
    let addr = socket
        .local_addr()
        .map_err(io)?
        .as_socket()
        .ok_or_else(|| bad("not an IPv4/IPv6 socket"))?;
    // systemd passes blocking sockets; tokio needs non-blocking ones.
    socket.set_nonblocking(true).map_err(io)?;
    Ok(Passed {
        fd,
        name,
        addr,
        socket,
    })
}

fn into_tokio(p: Passed) -> Option<tokio::net::TcpListener> {
    match tokio::net::TcpListener::from_std(p.socket.into()) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::error!(fd = p.fd, "socket activation: cannot use fd {}: {e}", p.fd);
            None
        }
    }
}

/// How a passed socket was matched to a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    Name,
    Address,
}

/// The matching, apart from the descriptors: `for_service[i]` is the index of the
/// socket for service `i` and how it was matched.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    for_service: Vec<Option<(usize, How)>>,
}

fn plan(services: &[(&str, SocketAddr)], sockets: &[(&str, SocketAddr)]) -> Plan {
    let mut taken = vec![false; sockets.len()];
    let mut for_service: Vec<Option<(usize, How)>> = vec![None; services.len()];
    // By name; among sockets sharing the name, the one on the configured address first.
    for (i, (name, listen)) in services.iter().enumerate() {
        let named = |j: &usize| !taken[*j] && sockets[*j].0 == *name;
        let pick = (0..sockets.len())
            .filter(named)
            .find(|j| sockets[*j].1 == *listen)
            .or_else(|| (0..sockets.len()).find(named));
        if let Some(j) = pick {
            taken[j] = true;
            for_service[i] = Some((j, How::Name));
        }
    }
    // By address, for sockets whose name is no service's ("unknown", a unit name). A
    // socket named for a service that already has one is a duplicate and stays unmatched.
    for (j, (name, addr)) in sockets.iter().enumerate() {
        if taken[j] || services.iter().any(|(n, _)| n == name) {
            continue;
        }
        if let Some(i) =
            (0..services.len()).find(|i| for_service[*i].is_none() && services[*i].1 == *addr)
        {
            taken[j] = true;
            for_service[i] = Some((j, How::Address));
        }
    }
    Plan { for_service }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn matches_by_name_then_address() {
        let services = [
            ("chat", a("127.0.0.1:8080")),
            ("admin", a("127.0.0.1:8081")),
            ("api", a("127.0.0.1:8082")),
        ];
        let sockets = [
            ("stray", a("127.0.0.1:9999")),
            ("unknown", a("127.0.0.1:8082")),
            ("chat", a("127.0.0.1:7000")),
        ];
        let p = plan(&services, &sockets);
        assert_eq!(
            p.for_service,
            vec![Some((2, How::Name)), None, Some((1, How::Address))]
        );
    }

    #[test]
    fn same_name_prefers_configured_address_and_leaves_duplicates() {
        let services = [("chat", a("[::1]:8080"))];
        let sockets = [("chat", a("127.0.0.1:8080")), ("chat", a("[::1]:8080"))];
        let p = plan(&services, &sockets);
        assert_eq!(p.for_service, vec![Some((1, How::Name))]);
    }

    #[test]
    fn a_socket_named_for_one_service_is_not_taken_by_another_by_address() {
        let services = [
            ("chat", a("127.0.0.1:8080")),
            ("admin", a("127.0.0.1:8081")),
        ];
        // "chat" already has its socket; a second "chat" socket on admin's address is a
        // mistake to report, not a socket for admin.
        let sockets = [("chat", a("127.0.0.1:8080")), ("chat", a("127.0.0.1:8081"))];
        let p = plan(&services, &sockets);
        assert_eq!(p.for_service, vec![Some((0, How::Name)), None]);
    }

    #[test]
    fn unit_name_falls_back_to_address() {
        let services = [("chat", a("127.0.0.1:8080"))];
        let sockets = [("lb.socket", a("127.0.0.1:8080"))];
        let p = plan(&services, &sockets);
        assert_eq!(p.for_service, vec![Some((0, How::Address))]);
    }

    #[test]
    fn status_text() {
        assert_eq!(backends_status(2, 3), "2/3 backends up");
    }
}
