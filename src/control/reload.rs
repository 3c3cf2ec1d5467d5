//! What `SIGHUP` (`systemctl reload`) applies and what it cannot: the
//! configuration file is read again and compared with the one the gateway
//! started with. The log level (`[log] level`) and the provisioning file's
//! new endpoints are applied (profiles are reloaded as before); any other
//! difference needs a restart and is reported as such, key by key.

use std::collections::BTreeSet;

/// Keys a reload applies.
pub const RELOADABLE: [&str; 2] = ["log.level", "directory.provisioning_file"];

/// The dotted keys whose values differ between two configuration files
/// (added, removed or changed), apart from [`RELOADABLE`] ones.
pub fn restart_needed(old: &toml::Value, new: &toml::Value) -> Vec<String> {
    let mut out = BTreeSet::new();
    diff("", old, new, &mut out);
    out.into_iter()
        .filter(|k| !RELOADABLE.contains(&k.as_str()))
        .collect()
}

fn diff(prefix: &str, a: &toml::Value, b: &toml::Value, out: &mut BTreeSet<String>) {
    match (a, b) {
        (toml::Value::Table(x), toml::Value::Table(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                // A table on one side only: its keys, one by one.
                let empty = toml::Value::Table(toml::Table::new());
                match (x.get(k), y.get(k)) {
                    (Some(v), Some(w)) => diff(&key, v, w, out),
                    (Some(v @ toml::Value::Table(_)), None) => diff(&key, v, &empty, out),
                    (None, Some(w @ toml::Value::Table(_))) => diff(&key, &empty, w, out),
                    _ => {
                        out.insert(key);
                    }
                }
            }
        }
        _ => {
            if a != b {
                out.insert(prefix.to_string());
            }
        }
    }
}

/// The configuration file as a TOML tree (for [`restart_needed`]).
pub fn read_tree(path: &std::path::Path) -> Result<toml::Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.parse::<toml::Table>()
        .map(toml::Value::Table)
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> toml::Value {
        toml::Value::Table(s.parse::<toml::Table>().unwrap())
    }

    #[test]
    fn differences_by_key_except_what_a_reload_applies() {
        let a = t("[gateway]\nlisten = \"0.0.0.0:5683\"\nshards = 2\n[log]\nlevel = \"info\"\n[kafka]\nbrokers = \"a:9092\"\n");
        let b = t("[gateway]\nlisten = \"0.0.0.0:5683\"\nshards = 4\n[log]\nlevel = \"debug\"\n[kafka]\nbrokers = \"a:9092\"\nlinger_ms = 1\n[directory]\nprovisioning_file = \"p.toml\"\n");
        assert_eq!(
            restart_needed(&a, &b),
            vec!["gateway.shards".to_string(), "kafka.linger_ms".into()]
        );
        assert!(restart_needed(&a, &a).is_empty());
        // A table that only gains the reloadable key is a key-level change.
        let c = t("[directory]\nsnapshot_dir = \"x\"\n");
        let d = t("[directory]\nsnapshot_dir = \"x\"\nprovisioning_file = \"p.toml\"\n");
        assert!(restart_needed(&c, &d).is_empty());
    }
}
