//! Hot reload of the plugin directory: file-system events (inotify) and SIGHUP both trigger
//! a reload; the new catalog is published on a watch channel that command handlers read.
//! The reloader task is the catalog's only writer.

use std::{path::PathBuf, sync::Arc, time::Duration};

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::plugin::Catalog;

/// Editors and config management write files in several steps; wait for quiet first.
const SETTLE: Duration = Duration::from_millis(200);
/// When the directory cannot be watched (it does not exist yet), look again this often.
const POLL: Duration = Duration::from_secs(5);

/// Load the directory, logging every file that was skipped and every warning.
pub fn load_logged(dir: &std::path::Path) -> Catalog {
    let catalog = match Catalog::load_dir(dir) {
        Ok(c) => c,
        Err(problem) => {
            warn!(%problem, "no plugins loaded; commands will be answered unknown_plugin until the directory exists");
            return Catalog::default();
        }
    };
    for p in &catalog.problems {
        warn!(file = %p.file.display(), problem = %p.message, "plugin file skipped");
    }
    for w in &catalog.warnings {
        warn!(file = %w.file.display(), warning = %w.message, "plugin will fail on this machine");
    }
    catalog
}

/// Whether an event can change what the directory holds. notify also reports files being
/// opened and read, and reading the plugin files is what a reload does (as does running a
/// plugin script kept there): reacting to those made the agent reload five times a second,
/// forever (0.4% CPU while idle).
fn changes_files(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Watch `dir` until `cancel` fires, publishing each changed catalog on `tx`.
pub async fn watch(dir: PathBuf, tx: watch::Sender<Arc<Catalog>>, cancel: CancellationToken) {
    let (events_tx, mut events) = mpsc::unbounded_channel::<()>();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.as_ref().is_ok_and(|e| !changes_files(&e.kind)) {
            return;
        }
        let _ = events_tx.send(());
    })
    .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
    let poll = match &watcher {
        Ok(_) => None,
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, poll_s = POLL.as_secs(), "cannot watch the plugin directory; polling it instead (SIGHUP also reloads)");
            Some(POLL)
        }
    };
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    // A file that arrived between the first load and the watch being set up raised no
    // event (a config-management run drops plugins right after starting the agent): look
    // once more now that changes are watched.
    let mut first = Some("watch started");
    loop {
        let why = if let Some(why) = first.take() {
            why
        } else {
            tokio::select! {
            () = cancel.cancelled() => break,
            Some(()) = events.recv() => {
                // Collapse a burst of events into one reload.
                loop {
                    tokio::select! {
                        Some(()) = events.recv() => {}
                        () = tokio::time::sleep(SETTLE) => break,
                    }
                }
                "file change"
            }
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
            () = async { match poll { Some(p) => tokio::time::sleep(p).await, None => std::future::pending().await } } => "poll",
            }
        };
        let dir2 = dir.clone();
        let Ok(new) = tokio::task::spawn_blocking(move || Catalog::load_dir(&dir2)).await else {
            continue;
        };
        let new = match new {
            Ok(c) => c,
            Err(_) if why != "file change" && why != "SIGHUP" => continue,
            Err(problem) => {
                warn!(%problem, "plugin directory unreadable; keeping the plugins loaded before");
                continue;
            }
        };
        let old = tx.borrow().clone();
        let diff = new.diff(&old);
        let problems_changed = new.problems != old.problems;
        if diff.is_empty() && !problems_changed {
            continue;
        }
        for p in new.problems.iter().filter(|p| !old.problems.contains(p)) {
            warn!(file = %p.file.display(), problem = %p.message, "plugin file skipped");
        }
        info!(trigger = why, added = ?diff.added, changed = ?diff.changed, removed = ?diff.removed, plugins = new.len(), "plugins reloaded");
        tx.send_replace(Arc::new(new));
    }
    drop(watcher);
}

#[cfg(test)]
mod tests {
    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RemoveKind};

    use super::changes_files;

    #[test]
    fn opening_and_reading_plugin_files_does_not_trigger_a_reload() {
        assert!(!changes_files(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!changes_files(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(!changes_files(&EventKind::Access(AccessKind::Read)));
        assert!(changes_files(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(changes_files(&EventKind::Create(CreateKind::File)));
        assert!(changes_files(&EventKind::Modify(ModifyKind::Any)));
        assert!(changes_files(&EventKind::Remove(RemoveKind::File)));
        assert!(changes_files(&EventKind::Any));
    }
}
