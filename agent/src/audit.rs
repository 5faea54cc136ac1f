//! The audit log: one JSON line per command this agent accepted, refused or finished, in
//! `<state dir>/audit.log` (mode 0600), for whoever must later answer "what ran here, and
//! on whose key?".

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::Path,
    sync::Mutex,
};

use chrono::Utc;
use serde::Serialize;
use tracing::warn;

use crate::guard::Provenance;

/// The audit log's file name in a node's state directory.
pub const FILE: &str = "audit.log";

#[derive(Debug)]
pub struct AuditLog {
    file: Mutex<File>,
}

/// One line of the audit log.
#[derive(Debug, Serialize)]
struct Line<'a> {
    time: chrono::DateTime<Utc>,
    event: &'a str,
    request_id: Option<uuid::Uuid>,
    key: Option<&'a str>,
    plugin: Option<&'a str>,
    /// Rejection class or plugin outcome.
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

impl AuditLog {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    fn write(&self, line: &Line<'_>) {
        let mut text = serde_json::to_vec(line).unwrap_or_default();
        text.push(b'\n');
        let written = match self.file.lock() {
            Ok(mut f) => f.write_all(&text),
            Err(poisoned) => poisoned.into_inner().write_all(&text),
        };
        if let Err(e) = written {
            warn!(error = %e, "cannot write the audit log");
        }
    }

    pub fn accepted(&self, provenance: &Provenance) {
        self.record("accepted", provenance, None, None);
    }

    pub fn rejected(&self, provenance: &Provenance, class: &str, reason: &str) {
        self.record("rejected", provenance, Some(class), Some(reason));
    }

    pub fn finished(&self, provenance: &Provenance, outcome: &str) {
        self.record("finished", provenance, Some(outcome), None);
    }

    fn record(
        &self,
        event: &str,
        provenance: &Provenance,
        outcome: Option<&str>,
        reason: Option<&str>,
    ) {
        self.write(&Line {
            time: Utc::now(),
            event,
            request_id: provenance.request_id,
            key: provenance.key_id.as_deref(),
            plugin: provenance.plugin.as_deref(),
            outcome,
            reason,
        });
    }
}
