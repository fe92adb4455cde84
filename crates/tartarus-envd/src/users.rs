//! Owner and group names from the sandbox's own /etc/passwd and /etc/group.

use std::collections::HashMap;
use std::path::PathBuf;

/// Id-to-name maps, read once per request (the files are small).
pub struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

fn parse(path: &str) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').map(str::to_owned).collect::<Vec<_>>())
        .filter(|f| f.len() >= 3)
        .collect()
}

fn id_map(path: &str) -> HashMap<u32, String> {
    let mut map = HashMap::new();
    for f in parse(path) {
        if let Ok(id) = f[2].parse::<u32>() {
            map.entry(id).or_insert_with(|| f[0].clone());
        }
    }
    map
}

impl Names {
    pub fn load() -> Names {
        Names {
            users: id_map("/etc/passwd"),
            groups: id_map("/etc/group"),
        }
    }
    pub fn user(&self, uid: u32) -> String {
        self.users.get(&uid).cloned().unwrap_or_else(|| uid.to_string())
    }
    pub fn group(&self, gid: u32) -> String {
        self.groups.get(&gid).cloned().unwrap_or_else(|| gid.to_string())
    }
}

/// The home directory of `uid` in /etc/passwd.
pub fn home_of(uid: u32) -> Option<PathBuf> {
    parse("/etc/passwd")
        .into_iter()
        .find(|f| f.len() >= 6 && f[2].parse::<u32>().ok() == Some(uid))
        .map(|f| PathBuf::from(&f[5]))
        .filter(|p| p.is_absolute())
}
