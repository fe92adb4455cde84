//! Sandboxes from images and templates: pulling on demand, applying an image's and a template's
//! defaults to a spec, and the per-template warm pools with their Python zygote.

use std::collections::HashSet;
use std::sync::Arc;

use tartarus_image::pull::{self, NoProgress, PullOptions};
use tartarus_image::runspec::apply_image;
use tartarus_image::store::{ImageRecord, ImageStore, StoreError};
use tartarus_image::template::{Template, WarmupLanguage};
use tartarus_runtime::{BindMount, SandboxSpec};

use crate::error::ApiError;
use crate::sandboxes::{Manager, PoolSpec};

/// Where template sandboxes find the python launcher (the `tartarus` binary) and the zygote's socket; the
/// names are the launcher's (see `tartarus_cli::commands::zygote`).
const LAUNCHER_DIR: &str = "/.tartarus/bin";
const ZYGOTE_SOCKET: &str = "/run/tartarus-zygote/socket";
const ZYGOTE_SERVE: &str = "--tartarus-zygote-serve";
const ZYGOTE_WAIT: &str = "--tartarus-zygote-wait";

/// Image access of the server.
#[derive(Clone)]
pub struct Images {
    pub store: ImageStore,
    /// Registries (host:port on loopback) pulled over plain HTTP.
    pub insecure_registries: Arc<HashSet<String>>,
    /// Registries user keys may use images of (`--registry`, and the insecure ones), as [`registry_name`]s.
    /// Empty: only the operator's side (admin keys, shared templates) names images.
    pub allowed_registries: Arc<HashSet<String>>,
}

/// On whose behalf an image is named: the operator (an admin key, a shared template) or a tenant (a user
/// key, a tenant's template).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullFor<'a> {
    Operator,
    Tenant(&'a str),
}

impl<'a> PullFor<'a> {
    /// For a template: its owner's side.
    pub fn owner(tenant: Option<&'a str>) -> Self {
        tenant.map_or(PullFor::Operator, PullFor::Tenant)
    }
}

/// A registry as the allowlist compares it: lower case, Docker Hub's aliases as `docker.io`.
pub fn registry_name(registry: &str) -> String {
    match registry.to_ascii_lowercase().as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

impl Images {
    /// The image, pulled first when it is not in the store.
    ///
    /// A tenant names only images of the allowed registries, pulled or not: otherwise a user key would
    /// probe any host and port from the server (the errors tell open ports from closed ones), pull with
    /// the operator's registry credentials, and start from private images the operator pulled. Its pull
    /// failures are one generic message; the cause goes to the server log.
    pub async fn ensure(&self, reference: &str, puller: PullFor<'_>) -> Result<ImageRecord, ApiError> {
        let invalid = |e: &dyn std::fmt::Display| ApiError::invalid(e.to_string());
        let registry = tartarus_image::store::registry_of(reference).map_err(|e| invalid(&e))?;
        if let PullFor::Tenant(_) = puller {
            self.allowed_for_tenants(reference, &registry)?;
        }
        // Present with every layer: done. Missing (or a layer pruned meanwhile): pull.
        match self.store.get(reference) {
            Ok(record) => return Ok(record),
            Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(invalid(&e)),
        }
        let options = PullOptions {
            insecure: self.insecure_registries.contains(&registry),
            // The operator's credentials (Docker config) serve tenants only on registries the operator
            // allowed for them, which is the only place a tenant pulls from.
            credentials: None,
        };
        let pulled = pull::pull(&self.store, reference, &options, Arc::new(NoProgress)).await;
        pulled.map_err(|e| {
            let cause = tartarus_runtime::error_chain(&e);
            match puller {
                PullFor::Operator => ApiError::invalid(format!("pulling image: {cause}")),
                PullFor::Tenant(tenant) => {
                    tracing::warn!(tenant, reference, "pulling an image for a tenant failed: {cause}");
                    ApiError::invalid(format!(
                        "pulling image '{reference}' failed (the operator finds the cause in the server log)"
                    ))
                }
            }
        })
    }

    /// Refuses (403) an image of a registry tenants may not use.
    fn allowed_for_tenants(&self, reference: &str, registry: &str) -> Result<(), ApiError> {
        if self.allowed_registries.is_empty() {
            return Err(ApiError::forbidden(format!(
                "image '{reference}': this server lets only admin keys name images (the operator allows \
                 registries for user keys with --registry HOST[:PORT])"
            )));
        }
        if !self.allowed_registries.contains(&registry_name(registry)) {
            let mut allowed: Vec<&str> = self.allowed_registries.iter().map(String::as_str).collect();
            allowed.sort_unstable();
            return Err(ApiError::forbidden(format!(
                "image '{reference}': registry {registry} is not one user keys may use (allowed: {})",
                allowed.join(", ")
            )));
        }
        Ok(())
    }
}

/// The warm pool of a template: its owner's (`None`: shared) and its id, since ids are per tenant.
pub fn pool_key(owner: Option<&str>, id: &str) -> String {
    // Neither `*` nor `/` is in a tenant name.
    format!("{}/{id}", owner.unwrap_or("*"))
}

/// Roots `spec` on an image: layers, environment under the spec's, working directory and user. The
/// image's Cmd does not become a main command (a server sandbox without `cmd` lives until deleted), but a
/// given `cmd` follows the image's Entrypoint.
pub fn root_on_image(spec: &mut SandboxSpec, images: &Images, image: &ImageRecord) -> Result<(), ApiError> {
    apply_image(spec, &images.store, image, false).map_err(|e| ApiError::invalid(e.to_string()))
}

/// Applies a template to a request's spec: image root, the template's environment under the request's,
/// working directory, resources (defaults, and the maximums as limits the request may not exceed) and
/// timeout; a Python warm-up adds the zygote. Returns whether the request is what the template's warm pool
/// holds (no command, no overrides), so a warm sandbox may serve it.
pub fn apply_template(
    spec: &mut SandboxSpec,
    template: &Template,
    images: &Images,
    image: &ImageRecord,
    shim_exe: &std::path::Path,
) -> Result<bool, ApiError> {
    let plain = spec.command.is_empty()
        && spec.workdir.is_none()
        && spec.timeout.is_none()
        && !spec.limits.any()
        && spec.network == tartarus_runtime::NetworkMode::None
        && spec.mounts.is_empty();
    let r = &template.resources;
    let cpus = spec.limits.cpus.unwrap_or(r.default_cpu);
    if cpus > r.max_cpu {
        return Err(ApiError::invalid(format!(
            "resources.cpus {cpus} exceeds template '{}' max_cpu {}",
            template.id, r.max_cpu
        )));
    }
    let memory_mb = spec
        .limits
        .memory_bytes
        .map(|b| b >> 20)
        .unwrap_or(r.default_memory);
    if memory_mb > r.max_memory {
        return Err(ApiError::invalid(format!(
            "resources.memory_mb {memory_mb} exceeds template '{}' max_memory {}",
            template.id, r.max_memory
        )));
    }
    spec.limits.cpus = Some(cpus);
    spec.limits.memory_bytes = Some(memory_mb << 20);
    if spec.timeout.is_none() {
        spec.timeout = template.timeout();
    }
    if spec.workdir.is_none() {
        spec.workdir = template.workdir.as_ref().map(Into::into);
    }
    let mut env: Vec<(String, String)> = template.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    env.append(&mut spec.env);
    spec.env = env;
    root_on_image(spec, images, image)?;
    if let Some((WarmupLanguage::Python, script)) = template.warmup() {
        add_zygote(spec, script, shim_exe);
    }
    Ok(plain)
}

/// Mounts the python launcher, points `PATH` at it, and (without a main command) makes the zygote the main
/// command, so every `python3` in the sandbox forks from the warmed interpreter.
fn add_zygote(spec: &mut SandboxSpec, warmup: &str, shim_exe: &std::path::Path) {
    for name in ["python3", "python"] {
        spec.mounts.push(BindMount {
            source: shim_exe.to_path_buf(),
            target: format!("{LAUNCHER_DIR}/{name}").into(),
            writable: false,
        });
    }
    let path = spec
        .env_value("PATH")
        .unwrap_or(tartarus_runtime::spec::DEFAULT_PATH)
        .to_string();
    spec.env.push(("PATH".into(), format!("{LAUNCHER_DIR}:{path}")));
    spec.env
        .push(("TARTARUS_ZYGOTE_SOCKET".into(), ZYGOTE_SOCKET.into()));
    spec.env.push(("TARTARUS_WARMUP".into(), warmup.to_string()));
    if spec.command.is_empty() {
        spec.command = vec![format!("{LAUNCHER_DIR}/python3"), ZYGOTE_SERVE.into()];
    }
}

/// The warm pool of a template: sandboxes as a plain request for it would get them, each with its zygote
/// warmed up before it is handed out.
pub fn template_pool(
    template: &Template,
    images: &Images,
    image: &ImageRecord,
    shim_exe: &std::path::Path,
) -> Result<PoolSpec, ApiError> {
    let mut spec = SandboxSpec {
        service: true,
        ..SandboxSpec::default()
    };
    apply_template(&mut spec, template, images, image, shim_exe)?;
    // A python warm-up runs in the zygote: wait until it is warm. A shell warm-up runs once in each pooled
    // sandbox before it is handed out (the operator's script: it loads libraries into the page cache and
    // prepares files).
    let warm_probe = template.warmup().map(|(language, script)| match language {
        WarmupLanguage::Python => vec![format!("{LAUNCHER_DIR}/python3"), ZYGOTE_WAIT.to_string()],
        WarmupLanguage::Shell => vec!["/bin/sh".to_string(), "-c".to_string(), script.to_string()],
    });
    Ok(PoolSpec {
        spec,
        size: template.pool.size as usize,
        warm_probe,
    })
}

/// Pulls a template's image (on its owner's behalf: `None` is a shared template) and (re)starts its warm
/// pool, in the background.
pub fn start_template_pool(
    manager: &Arc<Manager>,
    images: &Images,
    owner: Option<String>,
    template: Template,
) {
    let key = pool_key(owner.as_deref(), &template.id);
    if template.pool.size == 0 {
        manager.remove_pool(&key);
        return;
    }
    let manager = Arc::clone(manager);
    let images = images.clone();
    tokio::spawn(async move {
        let puller = PullFor::owner(owner.as_deref());
        let tenant = owner.as_deref().unwrap_or("(shared)");
        let image = match images.ensure(&template.base_image, puller).await {
            Ok(image) => image,
            Err(e) => {
                tracing::error!(template = %template.id, tenant, "warm pool: {}", e.message);
                return;
            }
        };
        match template_pool(&template, &images, &image, manager.shim_exe()) {
            Ok(pool) => manager.register_pool(&key, pool),
            Err(e) => tracing::error!(template = %template.id, tenant, "warm pool: {}", e.message),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_registry_names_fold_case_and_docker_hub_aliases() {
        assert_eq!(registry_name("Index.Docker.IO"), "docker.io");
        assert_eq!(registry_name("registry-1.docker.io"), "docker.io");
        assert_eq!(registry_name("127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(registry_name("GHCR.io"), "ghcr.io");
    }

    #[test]
    fn test_pool_keys_of_two_tenants_templates_with_one_id_differ() {
        assert_ne!(pool_key(Some("alpha"), "py"), pool_key(Some("beta"), "py"));
        assert_ne!(pool_key(None, "py"), pool_key(Some("py"), ""));
        assert_ne!(pool_key(None, "py"), crate::sandboxes::DEFAULT_POOL);
    }
}
