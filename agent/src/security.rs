//! What an agent needs from its state directory and key files before it may connect: the
//! runner keys it obeys (none is an error), its own key (created on first start), the
//! replay cache and the audit log, in a 0700 directory per node. Plugin processes a previous
//! agent left running are killed here too.

use std::os::unix::fs::DirBuilderExt;

use chrono::Utc;
use tracing::{info, warn};
use vogeler_config::AgentSettings;
use vogeler_proto::{
    guard::Guard,
    signing::{AuthorizedKeys, PrivateKey},
};

use crate::{AgentError, RUNNING_DIR, audit, audit::AuditLog, exec, replay::ReplayCache};

/// What an agent needs from its state directory and key files before it may connect.
pub struct Security {
    pub guard: Guard,
    pub key: PrivateKey,
    pub(crate) replay: ReplayCache,
    pub(crate) audit: AuditLog,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("node", &self.guard.node)
            .field("trusted_keys", &self.guard.keys.len())
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// This node's public key, from its state directory (created 0700 with the key when the
/// agent never ran).
pub fn node_key(settings: &AgentSettings) -> Result<vogeler_proto::signing::PublicKey, AgentError> {
    let dir = &settings.state_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| AgentError::State {
            path: dir.display().to_string(),
            source,
        })?;
    let (key, _) = vogeler_core::keyfile::load_or_create_private(&dir.join("agent.key"))?;
    Ok(key.public())
}

impl Security {
    /// Load the authorized keys (refusing to go on without one), create the node's state
    /// directory (0700), its key on first start, the replay cache and the audit log.
    pub fn load(settings: &AgentSettings) -> Result<Self, AgentError> {
        Self::with_keys(settings, Self::authorized_keys(settings)?)
    }

    /// The runner keys `agent.authorized_keys` names; none is an error.
    pub fn authorized_keys(settings: &AgentSettings) -> Result<AuthorizedKeys, AgentError> {
        let path = &settings.authorized_keys;
        let keys = if path.exists() {
            vogeler_core::keyfile::load_authorized(path)?
        } else {
            AuthorizedKeys::default()
        };
        if keys.is_empty() {
            return Err(AgentError::NoAuthorizedKeys {
                path: path.display().to_string(),
            });
        }
        Ok(keys)
    }

    /// [`Security::load`] with the authorized keys already read (a simulation reads them
    /// once for all its nodes).
    pub fn with_keys(settings: &AgentSettings, keys: AuthorizedKeys) -> Result<Self, AgentError> {
        let dir = &settings.state_dir;
        let state = |source| AgentError::State {
            path: dir.display().to_string(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(state)?;
        let running = dir.join(RUNNING_DIR);
        std::fs::create_dir_all(&running).map_err(state)?;
        let reaped = exec::reap_orphans(&running, settings.node.as_str());
        if reaped > 0 {
            warn!(node = %settings.node, processes = reaped, "killed plugin processes left running by a previous agent that did not stop cleanly");
        }
        let (key, created) = vogeler_core::keyfile::load_or_create_private(&dir.join("agent.key"))?;
        if created {
            info!(node = %settings.node, key = %key.public(), "created this node's signing key");
        }
        let replay = ReplayCache::open(&dir.join("replay"), Utc::now()).map_err(state)?;
        let bounds = audit::Bounds {
            max_bytes: settings.audit_max_bytes,
            files: settings.audit_files,
        };
        let audit = AuditLog::open(&dir.join(audit::FILE), bounds).map_err(state)?;
        Ok(Self {
            guard: Guard {
                node: settings.node.clone(),
                keys,
                max_clock_skew: settings.max_clock_skew,
                max_ttl: settings.max_command_ttl,
            },
            key,
            replay,
            audit,
        })
    }
}
