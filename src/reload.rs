//! Hot reload: SIGHUP, or a change of the config file on disk, leads to parse, validate
//! and (only if valid) apply as a diff. A bad file changes nothing that is running.
//!
//! The watch is on the file's directory, not the file: editors save by writing a new
//! file and renaming it over the old one, which a watch on the old inode would miss.
//! Events are debounced so a save in several writes is read once, after it settles.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::server::Balancer;

/// Quiet time after the last file event before the file is read.
const DEBOUNCE: Duration = Duration::from_millis(250);

/// Reloads `path` into `balancer` on SIGHUP and (if `watch`) on file changes, until `stop`.
pub async fn run(balancer: Arc<Balancer>, path: PathBuf, watch: bool, stop: CancellationToken) {
    let (tx, mut rx) = mpsc::unbounded_channel::<&'static str>();
    let _watcher = if watch {
        match watch_file(&path, tx.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot watch the config file ({e}); reload with SIGHUP");
                None
            }
        }
    } else {
        None
    };
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot install SIGHUP handler: {e}");
            None
        }
    };
    loop {
        let trigger = tokio::select! {
            _ = stop.cancelled() => return,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
            Some(t) = rx.recv() => {
                // Debounce: wait until the file has been quiet for a moment.
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(DEBOUNCE) => break,
                        Some(_) = rx.recv() => continue,
                    }
                }
                t
            }
        };
        // systemd: RELOADING=1 before, READY=1 after, whatever the outcome.
        crate::systemd::reloading();
        reload(&balancer, &path, trigger);
        let (healthy, total) = balancer.healthy_count();
        crate::systemd::ready(&crate::systemd::backends_status(healthy, total));
    }
}

/// One reload attempt; logs the outcome either way.
pub fn reload(balancer: &Balancer, path: &Path, trigger: &str) {
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(trigger, "reload failed, running configuration kept: {e}");
            balancer.record_reload_failure(e.to_string());
            return;
        }
    };
    if new == balancer.config() {
        tracing::debug!(trigger, "reload: configuration unchanged");
        return;
    }
    match balancer.apply(new) {
        Ok(summary) => tracing::info!(trigger, "reloaded {}: {summary}", path.display()),
        Err(e) => tracing::error!(trigger, "reload failed, running configuration kept: {e}"),
    }
}

fn watch_file(
    path: &Path,
    tx: mpsc::UnboundedSender<&'static str>,
) -> notify::Result<notify::RecommendedWatcher> {
    let file_name = path.file_name().map(|n| n.to_os_string());
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        // Only events about our file (other files in /etc/lb are none of our business).
        if event
            .paths
            .iter()
            .any(|p| p.file_name() == file_name.as_deref())
        {
            let _ = tx.send("file change");
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}
