//! Turning a pulled image into a sandbox: its layers become the root, its config the defaults.

use std::path::{Path, PathBuf};

use tartarus_runtime::{RootSpec, SandboxSpec, SandboxUser};

use crate::store::{ImageRecord, ImageStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ImageSpecError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("image {0} has neither Entrypoint nor Cmd: give the command after `--`")]
    NoCommand(String),
    #[error("image {reference}: user '{user}' {problem}")]
    User {
        reference: String,
        user: String,
        problem: String,
    },
}

/// Makes `spec` run on the image: the layers are its root; the image's environment goes under the
/// spec's own variables, its working directory and user apply unless the spec sets them, and the
/// command is Docker's: Entrypoint followed by the spec's command, or by the image's Cmd when the spec
/// has none and `default_command` is set. Without `default_command` an empty command stays empty (a
/// server sandbox without a main command lives until it is deleted).
pub fn apply_image(
    spec: &mut SandboxSpec,
    store: &ImageStore,
    image: &ImageRecord,
    default_command: bool,
) -> Result<(), ImageSpecError> {
    let layers = store.layer_dirs(image)?;
    let config = &image.config;
    let mut env: Vec<(String, String)> = config
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.append(&mut spec.env);
    spec.env = env;
    if spec.workdir.is_none() {
        spec.workdir = config.workdir.as_ref().map(PathBuf::from);
    }
    if spec.user.is_none() {
        if let Some(user) = &config.user {
            spec.user = Some(
                resolve_user(&layers, user).map_err(|problem| ImageSpecError::User {
                    reference: image.reference.clone(),
                    user: user.clone(),
                    problem,
                })?,
            );
        } else {
            spec.user = Some(SandboxUser { uid: 0, gid: 0 });
        }
    }
    if default_command || !spec.command.is_empty() {
        let arguments = match spec.command.is_empty() {
            true => config.cmd.clone().unwrap_or_default(),
            false => std::mem::take(&mut spec.command),
        };
        let mut command = config.entrypoint.clone().unwrap_or_default();
        command.extend(arguments);
        if command.is_empty() {
            return Err(ImageSpecError::NoCommand(image.reference.clone()));
        }
        spec.command = command;
    }
    spec.root = RootSpec::Layers(layers);
    Ok(())
}

/// Resolves an image `User` (`uid`, `uid:gid`, `name`, `name:group`) against the image's own
/// `/etc/passwd` and `/etc/group` (the top-most layer holding the file wins).
pub fn resolve_user(layers: &[PathBuf], user: &str) -> Result<SandboxUser, String> {
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = read_top_most(layers, "etc/passwd");
    let (uid, primary_gid) = match user_part.parse::<u32>() {
        Ok(uid) => {
            let gid = lookup(&passwd, |fields| fields.get(2) == Some(&user_part))
                .and_then(|f| f.get(3).and_then(|g| g.parse().ok()));
            (uid, gid.unwrap_or(uid))
        }
        Err(_) => {
            let fields = lookup(&passwd, |fields| fields.first() == Some(&user_part))
                .ok_or_else(|| "is not in the image's /etc/passwd".to_string())?;
            let uid = fields.get(2).and_then(|v| v.parse().ok());
            let gid = fields.get(3).and_then(|v| v.parse().ok());
            match (uid, gid) {
                (Some(uid), Some(gid)) => (uid, gid),
                _ => return Err("has a malformed /etc/passwd entry".into()),
            }
        }
    };
    let gid = match group_part {
        None => primary_gid,
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let groups = read_top_most(layers, "etc/group");
                lookup(&groups, |fields| fields.first() == Some(&group))
                    .and_then(|f| f.get(2).and_then(|g| g.parse().ok()))
                    .ok_or_else(|| format!("names group '{group}', which is not in the image's /etc/group"))?
            }
        },
    };
    if uid >= 65536 || gid >= 65536 {
        return Err(format!("maps to {uid}:{gid}; sandboxes have ids below 65536"));
    }
    Ok(SandboxUser { uid, gid })
}

fn read_top_most(layers: &[PathBuf], path: &str) -> String {
    for layer in layers.iter().rev() {
        let candidate = layer.join(path);
        // Whiteouts are character devices; only a regular file counts (and never follow a symlink out).
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.is_file() => return std::fs::read_to_string(&candidate).unwrap_or_default(),
            Ok(_) => return String::new(),
            Err(_) => continue,
        }
    }
    String::new()
}

fn lookup(table: &str, matches: impl Fn(&[&str]) -> bool) -> Option<Vec<&str>> {
    table
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| matches(fields))
}

/// The data directory's image store, unpacking for this process's id mapping.
pub fn open_store(data_dir: &Path) -> Result<ImageStore, StoreError> {
    let id_shift = rustix::process::geteuid()
        .is_root()
        .then_some(tartarus_runtime::process::PRIVILEGED_HOST_ID_BASE);
    ImageStore::open(data_dir, id_shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_from_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let lower = dir.path().join("lower");
        let upper = dir.path().join("upper");
        std::fs::create_dir_all(lower.join("etc")).unwrap();
        std::fs::create_dir_all(upper.join("etc")).unwrap();
        std::fs::write(lower.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        std::fs::write(
            upper.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1234:2345::/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(upper.join("etc/group"), "staff:x:50:\n").unwrap();
        let layers = vec![lower, upper];
        let user = |u: &str| resolve_user(&layers, u);
        assert_eq!(user("app"), Ok(SandboxUser { uid: 1234, gid: 2345 }));
        assert_eq!(user("app:staff"), Ok(SandboxUser { uid: 1234, gid: 50 }));
        assert_eq!(user("1234"), Ok(SandboxUser { uid: 1234, gid: 2345 }));
        assert_eq!(user("7:8"), Ok(SandboxUser { uid: 7, gid: 8 }));
        assert!(user("ghost").unwrap_err().contains("not in the image"));
        assert!(user("app:nogroup")
            .unwrap_err()
            .contains("not in the image's /etc/group"));
        assert!(user("70000").unwrap_err().contains("below 65536"));
    }
}
