//! A create request (`POST /v1/sandboxes`) translated and validated into a runtime spec.

use std::time::Duration;

use tartarus_runtime::{
    NetworkMode, ResourceLimits, RootSpec, SandboxSpec, MAX_CPUS, MAX_MEMORY_BYTES, MAX_PIDS, MAX_TIMEOUT,
    MAX_TIMEOUT_GRACE, MIN_MEMORY_BYTES, MIN_PIDS,
};
use tartarus_store::Role;

use crate::api::CreateSandbox;
use crate::auth::Caller;
use crate::error::ApiError;

/// What of the host the operator lets admin keys give a sandbox (`tartarus server --allow-host-network`,
/// `--allow-host-rootfs`). Off by default: a sandbox on the host's network namespace reaches the API,
/// `/metrics`, the database and every other tenant's listeners; a host directory as root is the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostAccess {
    /// `network: host-loopback` is allowed (admin keys only).
    pub network: bool,
    /// `rootfs: DIR` is allowed (admin keys only).
    pub rootfs: bool,
}

impl HostAccess {
    /// Refuses (403) what the caller may not take from the host: only admin keys, and only what the server
    /// was started to allow.
    fn check(self, caller: &Caller, what: &str, flag: &str, allowed: bool) -> Result<(), ApiError> {
        if caller.role != Role::Admin {
            return Err(ApiError::forbidden(format!(
                "{what} is for admin keys only (and a server started with {flag})"
            )));
        }
        if !allowed {
            return Err(ApiError::forbidden(format!(
                "{what} is off on this server: start it with {flag} to let admin keys use it"
            )));
        }
        Ok(())
    }
}

/// Translates and validates a create request into a runtime spec.
pub(crate) fn spec_from(
    body: &CreateSandbox,
    caller: &Caller,
    host: HostAccess,
) -> Result<SandboxSpec, ApiError> {
    let roots = [
        body.template.is_some(),
        body.image.is_some(),
        body.rootfs.is_some(),
    ];
    if roots.iter().filter(|r| **r).count() > 1 {
        return Err(ApiError::invalid(
            "give at most one of 'template', 'image' and 'rootfs'",
        ));
    }
    let mut spec = SandboxSpec::new(body.cmd.clone().unwrap_or_default());
    spec.service = true;
    if let Some(rootfs) = &body.rootfs {
        host.check(
            caller,
            "a host directory as rootfs",
            "--allow-host-rootfs",
            host.rootfs,
        )?;
        spec.root = RootSpec::Directory(rootfs.into());
    }
    spec.env = body.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    spec.workdir = body.cwd.as_ref().map(Into::into);
    // The bounds are the runtime's (`SandboxSpec::validate` checks the same numbers), said in the API's units.
    let r = &body.resources;
    if r.cpus.is_some_and(|c| !(c > 0.0 && c <= MAX_CPUS)) {
        return Err(ApiError::invalid(format!(
            "resources.cpus must be in (0, {MAX_CPUS}]"
        )));
    }
    let (min_mb, max_mb) = (MIN_MEMORY_BYTES >> 20, MAX_MEMORY_BYTES >> 20);
    if r.memory_mb.is_some_and(|m| !(min_mb..=max_mb).contains(&m)) {
        return Err(ApiError::invalid(format!(
            "resources.memory_mb must be between {min_mb} and {max_mb}"
        )));
    }
    if r.pids.is_some_and(|p| !(MIN_PIDS..=MAX_PIDS).contains(&p)) {
        return Err(ApiError::invalid(format!(
            "resources.pids must be between {MIN_PIDS} and {MAX_PIDS}"
        )));
    }
    spec.limits = ResourceLimits {
        memory_bytes: r.memory_mb.map(|m| m << 20),
        cpus: r.cpus,
        pids: r.pids,
    };
    if let Some(t) = body.timeout_s {
        let max = MAX_TIMEOUT.as_secs();
        if !(1..=max).contains(&t) {
            return Err(ApiError::invalid(format!(
                "timeout_s must be between 1 and {max}"
            )));
        }
        spec.timeout = Some(Duration::from_secs(t));
    }
    if let Some(g) = body.timeout_grace_s {
        let max = MAX_TIMEOUT_GRACE.as_secs();
        if g > max {
            return Err(ApiError::invalid(format!(
                "timeout_grace_s must be between 0 and {max}"
            )));
        }
        spec.timeout_grace = Some(Duration::from_secs(g));
    }
    spec.network = match body.network.as_deref() {
        None | Some("none") => NetworkMode::None,
        Some("host-loopback") => {
            host.check(
                caller,
                "the host's network (network: host-loopback)",
                "--allow-host-network",
                host.network,
            )?;
            NetworkMode::HostLoopback
        }
        // The contract comes from the policy in force (admission); without one, the safe default:
        // private ranges and metadata denied, no DNS.
        Some("egress") => NetworkMode::Egress(tartarus_runtime::EgressContract::default()),
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "unknown network '{other}': use none, egress or host-loopback"
            )))
        }
    };
    spec.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;
    use crate::api::Resources;

    fn caller(role: Role) -> Caller {
        Caller {
            key_id: "k".into(),
            tenant: "alpha".into(),
            role,
        }
    }

    const ALL: HostAccess = HostAccess {
        network: true,
        rootfs: true,
    };

    fn refused(body: CreateSandbox, role: Role) -> (StatusCode, String) {
        let e = spec_from(&body, &caller(role), ALL).unwrap_err();
        (e.status, e.message)
    }

    #[test]
    fn a_plain_request_is_a_service_sandbox_with_its_env_and_limits() {
        let body = CreateSandbox {
            cmd: Some(vec!["sleep".into(), "1".into()]),
            env: [("K".to_string(), "V".to_string())].into(),
            cwd: Some("/tmp".into()),
            resources: Resources {
                cpus: Some(0.5),
                memory_mb: Some(256),
                pids: Some(64),
            },
            timeout_s: Some(30),
            network: Some("egress".into()),
            ..CreateSandbox::default()
        };
        let spec = spec_from(&body, &caller(Role::User), HostAccess::default()).unwrap();
        assert!(spec.service);
        assert_eq!(spec.command, ["sleep", "1"]);
        assert_eq!(spec.env, [("K".to_string(), "V".to_string())]);
        assert_eq!(spec.limits.memory_bytes, Some(256 << 20));
        assert_eq!(spec.limits.pids, Some(64));
        assert_eq!(spec.timeout, Some(Duration::from_secs(30)));
        assert!(matches!(spec.network, NetworkMode::Egress(_)));
    }

    #[test]
    fn bounds_are_refused_with_the_field_named() {
        let with = |resources: Resources| CreateSandbox {
            resources,
            ..CreateSandbox::default()
        };
        let cases = [
            (
                with(Resources {
                    cpus: Some(0.0),
                    ..Resources::default()
                }),
                "resources.cpus",
            ),
            (
                with(Resources {
                    cpus: Some(f64::NAN),
                    ..Resources::default()
                }),
                "resources.cpus",
            ),
            (
                with(Resources {
                    cpus: Some(65.0),
                    ..Resources::default()
                }),
                "resources.cpus",
            ),
            (
                with(Resources {
                    memory_mb: Some(3),
                    ..Resources::default()
                }),
                "resources.memory_mb",
            ),
            (
                with(Resources {
                    pids: Some(1),
                    ..Resources::default()
                }),
                "resources.pids",
            ),
            (
                CreateSandbox {
                    timeout_s: Some(0),
                    ..CreateSandbox::default()
                },
                "timeout_s",
            ),
            (
                CreateSandbox {
                    timeout_s: Some(7 * 86_400 + 1),
                    ..CreateSandbox::default()
                },
                "timeout_s",
            ),
            (
                CreateSandbox {
                    timeout_grace_s: Some(301),
                    ..CreateSandbox::default()
                },
                "timeout_grace_s",
            ),
            (
                CreateSandbox {
                    network: Some("bridge".into()),
                    ..CreateSandbox::default()
                },
                "unknown network",
            ),
            (
                CreateSandbox {
                    image: Some("a".into()),
                    rootfs: Some("/".into()),
                    ..CreateSandbox::default()
                },
                "at most one",
            ),
        ];
        for (body, named) in cases {
            let (status, message) = refused(body, Role::Admin);
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{message}");
            assert!(message.contains(named), "{message} should name {named}");
        }
    }

    #[test]
    fn only_admins_choose_a_host_root() {
        let body = CreateSandbox {
            rootfs: Some("/srv/root".into()),
            ..CreateSandbox::default()
        };
        assert_eq!(refused(body.clone(), Role::User).0, StatusCode::FORBIDDEN);
        let spec = spec_from(&body, &caller(Role::Admin), ALL).unwrap();
        assert_eq!(spec.root, RootSpec::Directory("/srv/root".into()));
    }

    #[test]
    fn the_host_is_for_admins_of_a_server_that_allows_it() {
        let host_net = CreateSandbox {
            network: Some("host-loopback".into()),
            ..CreateSandbox::default()
        };
        let host_root = CreateSandbox {
            rootfs: Some("/srv/root".into()),
            ..CreateSandbox::default()
        };
        let only_network = HostAccess {
            network: true,
            rootfs: false,
        };
        let only_rootfs = HostAccess {
            network: false,
            rootfs: true,
        };
        for (body, flag, without, with) in [
            (&host_net, "--allow-host-network", only_rootfs, only_network),
            (&host_root, "--allow-host-rootfs", only_network, only_rootfs),
        ] {
            for role in [Role::User, Role::Viewer] {
                for access in [HostAccess::default(), ALL] {
                    let e = spec_from(body, &caller(role), access).unwrap_err();
                    assert_eq!(e.status, StatusCode::FORBIDDEN, "{}", e.message);
                    assert!(e.message.contains("admin keys only"), "{}", e.message);
                }
            }
            let e = spec_from(body, &caller(Role::Admin), without).unwrap_err();
            assert_eq!(e.status, StatusCode::FORBIDDEN);
            assert!(e.message.contains(flag), "{} should name {flag}", e.message);
            assert!(!e.message.contains('\n'));
            assert!(spec_from(body, &caller(Role::Admin), with).is_ok());
        }
        let spec = spec_from(&host_net, &caller(Role::Admin), only_network).unwrap();
        assert_eq!(spec.network, NetworkMode::HostLoopback);
    }
}
