//! Image references in their canonical form (`busybox` → `docker.io/library/busybox:latest`), checked
//! against the distribution reference grammar.
//!
//! `oci-client` parses references too, but through `regex`, whose tables would be linked into the lean
//! `tartarus` binary (which looks images up for `run --image`) and slow every sandbox's start-up by their
//! relocations. This is the same grammar without regex; a unit test holds it to `oci-client`'s answers.

use std::fmt;

const DOCKER_HUB: &str = "docker.io";

/// A parsed reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference {
    /// Registry host and optional port, e.g. `docker.io`, `127.0.0.1:5000`.
    pub registry: String,
    /// Repository path, e.g. `library/python`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ReferenceError(pub String);

impl ImageReference {
    pub fn parse(text: &str) -> Result<ImageReference, ReferenceError> {
        let bad = |what: &str| Err(ReferenceError(what.to_string()));
        if text.is_empty() || text.len() > 4096 {
            return bad("a reference is 1 to 4096 characters");
        }
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => {
                if !valid_digest(digest) {
                    return bad("the digest must look like sha256:<64 hex digits>");
                }
                (rest, Some(digest.to_string()))
            }
            None => (text, None),
        };
        // A tag follows the last ':' that comes after the last '/' (a ':' before it is a port).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &rest[last_slash + i + 1..];
                if !valid_tag(tag) {
                    return bad(
                        "a tag is 1 to 128 letters, digits, '_', '.' or '-', not starting with '.' or '-'",
                    );
                }
                (&rest[..last_slash + i], Some(tag.to_string()))
            }
            None => (rest, None),
        };
        // The grammar: `[domain "/"] path`, where a domain may be any host name (capitals allowed) and path
        // components are lower-case. Which part is the registry is then decided by shape, as Docker does.
        let components: Vec<&str> = name.split('/').collect();
        let all_path = components.iter().all(|c| valid_path_component(c));
        let domain_then_path = components.len() > 1
            && valid_domain(components[0])
            && components[1..].iter().all(|c| valid_path_component(c));
        if name.len() > 255 || !(all_path || domain_then_path) {
            return bad(
                "repository names are lower-case letters and digits, separated by '/', '.', '_', '__' or '-'",
            );
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_string(), path.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let repository = match (registry == DOCKER_HUB, repository.contains('/')) {
            (true, false) => format!("library/{repository}"),
            _ => repository,
        };
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(ImageReference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn valid_path_component(component: &str) -> bool {
    // [a-z0-9]+ ( ( [._] | __ | -+ ) [a-z0-9]+ )*
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn valid_domain(domain: &str) -> bool {
    // host[:port]; like oci-client, no bracketed IPv6 literals.
    let (host, port) = match domain.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (domain, None),
    };
    if let Some(port) = port {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    // Labels of letters, digits and '-', not starting or ending with '-', separated by '.'.
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn valid_digest(digest: &str) -> bool {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return false;
    };
    !algorithm.is_empty()
        && algorithm
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'+' | b'.' | b'_' | b'-'))
        && hex.len() >= 32
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every answer agrees with oci-client's parser (the regex implementation of the same grammar).
    #[test]
    fn agrees_with_oci_client() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let cases = [
            "busybox".to_string(),
            "busybox:1.36".into(),
            "library/busybox".into(),
            "python:3.11-slim".into(),
            "org/app".into(),
            "org/team/app:v2".into(),
            "ghcr.io/org/app:1".into(),
            "quay.io/jupyter/scipy-notebook:python-3.11".into(),
            "127.0.0.1:5000/test/base:1".into(),
            "localhost/app".into(),
            "localhost:5000/app:tag".into(),
            "registry.example.com:443/a/b/c".into(),
            "[::1]:5000/a:b".into(),
            format!("busybox@{digest}"),
            format!("ghcr.io/org/app:1@{digest}"),
            format!("127.0.0.1:5000/x@{digest}"),
            "a_b.c__d-e---f/g".into(),
            "UPPER/case".into(),
            "library/UPPER:x".into(),
            "has space".into(),
            "a//b".into(),
            "a/b/".into(),
            "-a".into(),
            "a:".into(),
            "a:.tag".into(),
            "a@sha256:short".into(),
            ":tag".into(),
            "".into(),
            "a..b".into(),
            "a___b".into(),
            "ex ample.com/a".into(),
            "example.com:port/a".into(),
        ];
        for case in cases {
            let ours = ImageReference::parse(&case).map(|r| r.to_string());
            let theirs = case.parse::<oci_client::Reference>().map(|r| r.whole());
            match (&ours, &theirs) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{case:?}"),
                (Err(_), Err(_)) => {}
                _ => panic!("{case:?}: ours {ours:?}, oci-client {theirs:?}"),
            }
        }
    }

    #[test]
    fn parts_are_split() {
        let r = ImageReference::parse("127.0.0.1:5000/team/app:2").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "team/app", Some("2"))
        );
        assert_eq!(ImageReference::parse("busybox").unwrap().registry, "docker.io");
    }
}
