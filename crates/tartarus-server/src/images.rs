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

/// Where template sandboxes find the python shim (the `tartarus` binary) and the zygote's socket; the
/// names are the shim's (see `tartarus_cli::commands::zygote`).
const SHIM_DIR: &str = "/.tartarus/bin";
const ZYGOTE_SOCKET: &str = "/run/tartarus-zygote/socket";
const ZYGOTE_SERVE: &str = "--tartarus-zygote-serve";
const ZYGOTE_WAIT: &str = "--tartarus-zygote-wait";

/// Image access of the server.
#[derive(Clone)]
pub struct Images {
    pub store: ImageStore,
    /// Registries (host:port on loopback) pulled over plain HTTP.
    pub insecure_registries: Arc<HashSet<String>>,
}

impl Images {
    /// The image, pulled first when it is not in the store.
    pub async fn ensure(&self, reference: &str) -> Result<ImageRecord, ApiError> {
        let invalid = |e: &dyn std::fmt::Display| ApiError::invalid(e.to_string());
        // Present with every layer: done. Missing (or a layer pruned meanwhile): pull.
        match self.store.get(reference) {
            Ok(record) => return Ok(record),
            Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(invalid(&e)),
        }
        let registry = tartarus_image::store::registry_of(reference).map_err(|e| invalid(&e))?;
        let options = PullOptions {
            insecure: self.insecure_registries.contains(&registry),
            credentials: None,
        };
        pull::pull(&self.store, reference, &options, Arc::new(NoProgress))
            .await
            .map_err(|e| ApiError::invalid(format!("pulling image: {}", tartarus_runtime::error_chain(&e))))
    }
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

/// Mounts the python shim, points `PATH` at it, and (without a main command) makes the zygote the main
/// command, so every `python3` in the sandbox forks from the warmed interpreter.
fn add_zygote(spec: &mut SandboxSpec, warmup: &str, shim_exe: &std::path::Path) {
    for name in ["python3", "python"] {
        spec.mounts.push(BindMount {
            source: shim_exe.to_path_buf(),
            target: format!("{SHIM_DIR}/{name}").into(),
            writable: false,
        });
    }
    let path = spec
        .env_value("PATH")
        .unwrap_or(tartarus_runtime::spec::DEFAULT_PATH)
        .to_string();
    spec.env.push(("PATH".into(), format!("{SHIM_DIR}:{path}")));
    spec.env
        .push(("TARTARUS_ZYGOTE_SOCKET".into(), ZYGOTE_SOCKET.into()));
    spec.env.push(("TARTARUS_WARMUP".into(), warmup.to_string()));
    if spec.command.is_empty() {
        spec.command = vec![format!("{SHIM_DIR}/python3"), ZYGOTE_SERVE.into()];
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
        WarmupLanguage::Python => vec![format!("{SHIM_DIR}/python3"), ZYGOTE_WAIT.to_string()],
        WarmupLanguage::Shell => vec!["/bin/sh".to_string(), "-c".to_string(), script.to_string()],
    });
    Ok(PoolSpec {
        spec,
        size: template.pool.size as usize,
        warm_probe,
    })
}

/// Pulls a template's image and (re)starts its warm pool, in the background.
pub fn start_template_pool(manager: &Arc<Manager>, images: &Images, template: Template) {
    if template.pool.size == 0 {
        manager.remove_pool(&template.id);
        return;
    }
    let manager = Arc::clone(manager);
    let images = images.clone();
    tokio::spawn(async move {
        let image = match images.ensure(&template.base_image).await {
            Ok(image) => image,
            Err(e) => {
                tracing::error!(template = %template.id, "warm pool: {}", e.message);
                return;
            }
        };
        match template_pool(&template, &images, &image, manager.shim_exe()) {
            Ok(pool) => manager.register_pool(&template.id, pool),
            Err(e) => tracing::error!(template = %template.id, "warm pool: {}", e.message),
        }
    });
}
