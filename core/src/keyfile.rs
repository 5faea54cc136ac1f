//! Key files on disk: a private key (PKCS#8 PEM, mode 0600, refused when others can read it,
//! as ssh does) and authorized-keys files or directories. Parsing and verifying are
//! [`vogeler_proto::signing`]'s; this module only reads and writes.

use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use vogeler_proto::signing::{AuthorizedKeys, KeyError, PrivateKey};

/// Read a PKCS#8 PEM key, refusing one that others can read.
pub fn load_private(path: &Path) -> Result<PrivateKey, KeyError> {
    let read = |source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Unprotected {
            path: path.to_path_buf(),
            mode,
        });
    }
    let pem = std::fs::read_to_string(path).map_err(read)?;
    PrivateKey::from_pkcs8_pem(&pem).map_err(|reason| KeyError::BadPrivateKey {
        path: path.to_path_buf(),
        reason,
    })
}

/// Write the key to a new file with mode 0600; never overwrites.
pub fn save_private(key: &PrivateKey, path: &Path) -> Result<(), KeyError> {
    let pem = key.to_pkcs8_pem().map_err(KeyError::Random)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => KeyError::Exists {
                path: path.to_path_buf(),
            },
            _ => KeyError::Write {
                path: path.to_path_buf(),
                source,
            },
        })?;
    f.write_all(pem.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|source| KeyError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// The key at `path`, created on first use (an agent's own key). Returns whether it was
/// created.
pub fn load_or_create_private(path: &Path) -> Result<(PrivateKey, bool), KeyError> {
    if path.exists() {
        return load_private(path).map(|k| (k, false));
    }
    let key = PrivateKey::generate()?;
    match save_private(&key, path) {
        Ok(()) => Ok((key, true)),
        // Another process created it in between: use theirs.
        Err(KeyError::Exists { .. }) => load_private(path).map(|k| (k, false)),
        Err(e) => Err(e),
    }
}

/// Read a file of authorized-key lines, or every `*.pub` file of a directory. Every bad
/// line is reported at once.
pub fn load_authorized(path: &Path) -> Result<AuthorizedKeys, KeyError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| KeyError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let mut files = Vec::new();
    if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "pub"))
            .collect();
        paths.sort();
        for p in paths {
            files.push((read(&p)?, p));
        }
    } else {
        files.push((read(path)?, path.to_path_buf()));
    }
    let texts: Vec<(String, String)> = files
        .into_iter()
        .map(|(text, file)| (text, file.display().to_string()))
        .collect();
    AuthorizedKeys::parse_all(texts.iter().map(|(t, o)| (t.as_str(), o.as_str())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_must_be_private() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("runner.key");
        let (k, created) = load_or_create_private(&path).expect("create");
        assert!(created);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, created) = load_or_create_private(&path).expect("load");
        assert!(!created);
        assert_eq!(again.public(), k.public());
        assert!(matches!(
            save_private(&k, &path),
            Err(KeyError::Exists { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load_private(&path).expect_err("unprotected");
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn a_directory_of_pub_files_is_read_in_order() {
        let dir = tempfile::tempdir().expect("dir");
        let a = PrivateKey::generate().expect("key").public();
        let b = PrivateKey::generate().expect("key").public();
        std::fs::write(dir.path().join("b.pub"), b.to_line("b")).expect("write");
        std::fs::write(dir.path().join("a.pub"), a.to_line("a")).expect("write");
        std::fs::write(dir.path().join("notes.txt"), "not a key").expect("write");
        let keys = load_authorized(dir.path()).expect("load");
        assert_eq!(keys.len(), 2);
        assert!(keys.find(&a).expect("a").source.ends_with("a.pub:1"));
        std::fs::write(dir.path().join("c.pub"), "ed25519 bad").expect("write");
        let err = load_authorized(dir.path()).expect_err("bad line");
        assert!(err.to_string().contains("c.pub:1"), "{err}");
    }
}
