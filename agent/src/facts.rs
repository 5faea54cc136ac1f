//! The few facts an agent announces about its node (OS, kernel, architecture), read in-process
//! so every node reports them, whatever plugins it has. Richer facts come from the `facts`
//! plugin.

use serde_json::{Map, Value, json};

/// `{hostname, os: {id, family, name, version}, kernel, arch, cpus, memory_mb}`; unknown
/// parts are left out.
pub fn collect() -> Map<String, Value> {
    let mut facts = Map::new();
    if let Some(h) = crate::hostname() {
        facts.insert("hostname".into(), Value::String(h));
    }
    if let Ok(u) = nix::sys::utsname::uname() {
        facts.insert(
            "kernel".into(),
            Value::String(u.release().to_string_lossy().into_owned()),
        );
        facts.insert(
            "arch".into(),
            Value::String(u.machine().to_string_lossy().into_owned()),
        );
    }
    if let Ok(text) = std::fs::read_to_string("/etc/os-release") {
        facts.insert("os".into(), os(&text));
    }
    if let Ok(n) = std::thread::available_parallelism() {
        facts.insert("cpus".into(), json!(n.get()));
    }
    if let Some(kib) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines().find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
    }) {
        facts.insert("memory_mb".into(), json!(kib / 1024));
    }
    facts
}

fn os(os_release: &str) -> Value {
    let get = |key: &str| {
        os_release
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim().trim_matches(['"', '\'']).to_string())
    };
    let id = get("ID").unwrap_or_default();
    let like = get("ID_LIKE").unwrap_or_default();
    json!({ "id": id, "family": family(&id, &like), "name": get("NAME"), "version": get("VERSION_ID") })
}

/// The OS family as facter names it, so fact filters read the same across tools.
pub fn family(id: &str, like: &str) -> String {
    let words: Vec<&str> = id
        .split_whitespace()
        .chain(like.split_whitespace())
        .collect();
    let any = |names: &[&str]| words.iter().any(|w| names.contains(w));
    if any(&["debian", "ubuntu"]) {
        "Debian"
    } else if any(&["rhel", "fedora", "centos"]) {
        "RedHat"
    } else if any(&["suse", "opensuse"]) {
        "Suse"
    } else if any(&["arch"]) {
        "Archlinux"
    } else if any(&["alpine"]) {
        "Alpine"
    } else {
        id
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_is_read_like_facter() {
        let v = os(
            "PRETTY_NAME=\"Rocky Linux 9\"\nNAME=\"Rocky Linux\"\nID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\nVERSION_ID=\"9.3\"\n",
        );
        assert_eq!(
            v,
            json!({"id": "rocky", "family": "RedHat", "name": "Rocky Linux", "version": "9.3"})
        );
        assert_eq!(family("debian", ""), "Debian");
        assert_eq!(family("ubuntu", "debian"), "Debian");
        assert_eq!(family("gentoo", ""), "gentoo");
    }

    #[test]
    fn this_machine_has_kernel_and_arch() {
        let f = collect();
        assert!(f["kernel"].as_str().is_some_and(|k| !k.is_empty()), "{f:?}");
        assert!(f["arch"].as_str().is_some_and(|a| !a.is_empty()), "{f:?}");
        assert!(
            f["cpus"].as_u64().is_some_and(|n| n >= 1)
                && f["memory_mb"].as_u64().is_some_and(|m| m > 0),
            "{f:?}"
        );
    }
}
