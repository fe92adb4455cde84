//! Templates: an OCI image plus the defaults a sandbox made from it gets (resources, env, working
//! directory, lifetime), a warm-up script and the size of the warm pool the server keeps for it.
//!
//! Users write templates as YAML (JSON is YAML) and [`parse_template`] validates them, pointing every error
//! at `file:line:column` and the offending key. The server stores the canonical JSON of a [`Template`]
//! ([`Template::to_json`]) and shows it back as JSON or YAML ([`Template::to_yaml`]).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Most CPUs a template may give or allow: a sandbox's own bound.
pub const MAX_CPUS: f64 = tartarus_runtime::MAX_CPUS;
/// Most memory, in MiB, a template may give or allow: a sandbox's own bound.
pub const MAX_MEMORY_MIB: u64 = tartarus_runtime::MAX_MEMORY_BYTES >> 20;
/// Most warm sandboxes the server keeps for one template.
pub const MAX_POOL: u32 = 64;
/// Longest lifetime a template may set: a sandbox's own bound.
pub const MAX_TIMEOUT: Duration = tartarus_runtime::MAX_TIMEOUT;

/// A validated template (see the module docs for the YAML shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// Lower-case letters, digits and `-`, starting with a letter or digit; at most 63 characters.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// An image reference such as `python:3.11-slim` or `ghcr.io/org/image@sha256:…`.
    pub base_image: String,
    /// Run once in each new sandbox before it is handed out (for python: the imports a zygote preloads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_script: Option<String>,
    /// How the warm-up runs; `python` when a script is given without a language.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_language: Option<WarmupLanguage>,
    #[serde(default)]
    pub resources: TemplateResources,
    /// Environment of every process in the sandbox.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory of commands in the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(default)]
    pub pool: PoolConfig,
    /// Lifetime limit of a sandbox, e.g. `10m`, `1h30m`, `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// The interpreter of a warm-up script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmupLanguage {
    /// Run by the image's `python3` (what the zygote preloads).
    Python,
    /// Run by `/bin/sh -c`.
    Shell,
}

/// What a sandbox gets unless its request says otherwise, and the most a request may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(from = "ResourcesConfig")]
pub struct TemplateResources {
    pub default_cpu: f64,
    /// MiB.
    pub default_memory: u64,
    pub max_cpu: f64,
    /// MiB.
    pub max_memory: u64,
}

const DEFAULT_CPU: f64 = 1.0;
const DEFAULT_MEMORY_MIB: u64 = 512;

impl Default for TemplateResources {
    fn default() -> Self {
        ResourcesConfig::default().into()
    }
}

/// `resources` as written: every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourcesConfig {
    default_cpu: Option<f64>,
    default_memory: Option<u64>,
    max_cpu: Option<f64>,
    max_memory: Option<u64>,
}

impl From<ResourcesConfig> for TemplateResources {
    /// A missing maximum is the default; a missing default is the usual one, lowered to a smaller maximum.
    fn from(c: ResourcesConfig) -> Self {
        let default_cpu = c
            .default_cpu
            .unwrap_or_else(|| c.max_cpu.map_or(DEFAULT_CPU, |max| DEFAULT_CPU.min(max)));
        let default_memory = c.default_memory.unwrap_or_else(|| {
            c.max_memory
                .map_or(DEFAULT_MEMORY_MIB, |max| DEFAULT_MEMORY_MIB.min(max))
        });
        TemplateResources {
            default_cpu,
            default_memory,
            max_cpu: c.max_cpu.unwrap_or(default_cpu),
            max_memory: c.max_memory.unwrap_or(default_memory),
        }
    }
}

/// The warm pool of a template.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Warm sandboxes the server keeps started (0 to [`MAX_POOL`]).
    #[serde(default)]
    pub size: u32,
}

/// A template that cannot be used: where (`file:line:column` when known) and why, naming the key.
pub type TemplateError = tartarus_document::DocumentError;

/// A broken rule: the key it is about and what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Violation {
    key: Vec<String>,
    message: String,
}

fn violation(key: &[&str], message: impl Into<String>) -> Violation {
    Violation {
        key: key.iter().map(|k| k.to_string()).collect(),
        message: message.into(),
    }
}

/// Parses and validates a template written in YAML or JSON; `source` names the text in errors (a file name).
pub fn parse_template(text: &str, source: &str) -> Result<Template, TemplateError> {
    let mut template: Template = tartarus_document::parse(text, source)?;
    template.check().map_err(|v| TemplateError {
        file: source.to_string(),
        location: locate_key(text, &v.key),
        key: Some(v.key.join(".")),
        message: v.message,
    })?;
    template.normalize();
    Ok(template)
}

impl Template {
    /// Checks every rule of the module docs (templates built in code, not parsed, need this too).
    pub fn validate(&self) -> Result<(), TemplateError> {
        self.check().map_err(|v| TemplateError {
            file: self.id.clone(),
            location: None,
            key: Some(v.key.join(".")),
            message: v.message,
        })
    }

    /// The canonical JSON (what the server stores).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a template (strings, numbers, string maps) always serialises")
    }

    /// The template as YAML, as `parse_template` reads it back.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("a template (strings, numbers, string maps) always serialises")
    }

    /// The lifetime limit, if any.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout.as_deref().and_then(parse_duration)
    }

    /// The warm-up language in effect: `python` when a script is given without one.
    pub fn warmup(&self) -> Option<(WarmupLanguage, &str)> {
        let script = self.warmup_script.as_deref()?;
        Some((self.warmup_language.unwrap_or(WarmupLanguage::Python), script))
    }

    fn normalize(&mut self) {
        if self.warmup_script.is_some() && self.warmup_language.is_none() {
            self.warmup_language = Some(WarmupLanguage::Python);
        }
    }

    fn check(&self) -> Result<(), Violation> {
        check_id(&self.id)?;
        if self.name.trim().is_empty() || self.name.chars().count() > 128 {
            return Err(violation(&["name"], "name must be 1-128 characters"));
        }
        check_image(&self.base_image)?;
        match (&self.warmup_script, self.warmup_language) {
            (Some(script), _) if script.trim().is_empty() => {
                return Err(violation(
                    &["warmup_script"],
                    "warmup_script is empty: write the warm-up or remove the key",
                ))
            }
            (None, Some(_)) => {
                return Err(violation(
                    &["warmup_language"],
                    "warmup_language is set without a warmup_script",
                ))
            }
            _ => {}
        }
        self.resources.check()?;
        for (key, value) in &self.env {
            if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
                return Err(violation(
                    &["env", key],
                    format!("env '{key}': names must be non-empty without '=', and neither may hold NUL"),
                ));
            }
        }
        if let Some(dir) = &self.workdir {
            if !dir.starts_with('/') || dir.contains('\0') {
                return Err(violation(
                    &["workdir"],
                    format!("workdir '{dir}' must be an absolute path"),
                ));
            }
        }
        if self.pool.size > MAX_POOL {
            return Err(violation(
                &["pool", "size"],
                format!("pool.size {} is more than {MAX_POOL}", self.pool.size),
            ));
        }
        if let Some(text) = &self.timeout {
            if parse_duration(text).is_none_or(|d| d > MAX_TIMEOUT) {
                return Err(violation(
                    &["timeout"],
                    format!("timeout '{text}' must be a duration up to 7 days, e.g. 30s, 10m, 1h30m"),
                ));
            }
        }
        Ok(())
    }
}

impl TemplateResources {
    fn check(&self) -> Result<(), Violation> {
        for (key, cpu) in [("default_cpu", self.default_cpu), ("max_cpu", self.max_cpu)] {
            if !(cpu > 0.0 && cpu <= MAX_CPUS) {
                return Err(violation(
                    &["resources", key],
                    format!("resources.{key} must be more than 0 and at most {MAX_CPUS}"),
                ));
            }
        }
        for (key, mib) in [
            ("default_memory", self.default_memory),
            ("max_memory", self.max_memory),
        ] {
            if !(1..=MAX_MEMORY_MIB).contains(&mib) {
                return Err(violation(
                    &["resources", key],
                    format!("resources.{key} must be between 1 and {MAX_MEMORY_MIB} (MiB)"),
                ));
            }
        }
        if self.default_cpu > self.max_cpu {
            return Err(violation(
                &["resources", "default_cpu"],
                format!(
                    "resources.default_cpu ({}) is more than resources.max_cpu ({})",
                    self.default_cpu, self.max_cpu
                ),
            ));
        }
        if self.default_memory > self.max_memory {
            return Err(violation(
                &["resources", "default_memory"],
                format!(
                    "resources.default_memory ({}) is more than resources.max_memory ({})",
                    self.default_memory, self.max_memory
                ),
            ));
        }
        Ok(())
    }
}

pub use tartarus_document::valid_id;

fn check_id(id: &str) -> Result<(), Violation> {
    match valid_id(id) {
        true => Ok(()),
        false => Err(violation(
            &["id"],
            format!(
                "id '{id}' is invalid: use 1-63 lower-case letters, digits and '-', starting with a letter or digit"
            ),
        )),
    }
}

/// The shape of a reference only (`[host/]path[:tag][@digest]`); whether it exists is the registry's call.
fn check_image(image: &str) -> Result<(), Violation> {
    let bad = |why: &str| Err(violation(&["base_image"], format!("base_image '{image}' {why}")));
    if image.is_empty() {
        return bad("must not be empty");
    }
    if image.len() > 512 {
        return bad("is longer than 512 characters");
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("must not contain whitespace");
    }
    if image.starts_with(['/', ':', '@', '-', '.']) || image.ends_with(['/', ':', '@']) {
        return bad("is not an image reference (e.g. python:3.11-slim)");
    }
    Ok(())
}

/// A duration as the command line's `--timeout` takes it (`30s`, `1m30s`, `250ms`, a bare number of
/// seconds); `None` when malformed or zero.
pub fn parse_duration(text: &str) -> Option<Duration> {
    tartarus_runtime::units::parse_duration(text).ok()
}

/// Where a key (a path of nested mapping keys) is written: 1-based line and column of its first match,
/// searching each part after its parent. A heuristic over the text (serde_yaml_ng keeps no positions in
/// values): block (`key:`), flow (`{key: …}`) and quoted JSON (`"key":`) keys, skipping comments.
/// Falls back to the deepest part found.
fn locate_key(text: &str, path: &[String]) -> Option<(usize, usize)> {
    let mut from = 0;
    let mut found = None;
    for (depth, key) in path.iter().enumerate() {
        // A top-level key of block YAML starts its line; try that first.
        let at = if depth == 0 {
            tartarus_document::find_key(text, key, from, true)
                .or_else(|| tartarus_document::find_key(text, key, from, false))
        } else {
            tartarus_document::find_key(text, key, from, false)
        };
        let Some(at) = at else { break };
        found = Some(at);
        from = at + key.len();
    }
    found.map(|at| tartarus_document::line_column(text, at))
}

/// A commented template for `tartarus init template --name NAME --from IMAGE`: valid as written, with the
/// optional keys shown as comments. The id is `name` made into an id (`My Python` → `my-python`).
pub fn init_template_yaml(name: &str, from: &str) -> String {
    let id = id_from_name(name);
    let name = quote(name);
    let image = quote(from);
    format!(
        r#"# A Tartarus template: an OCI image plus the defaults and warm-up of sandboxes made from it.
# Upload it with `tartarus template create -f FILE`; every key is checked, unknown keys are refused.

# Lower-case letters, digits and '-', starting with a letter or digit; at most 63 characters.
id: {id}
name: {name}
# description: What sandboxes of this template are for

# An image reference; a bare name such as python:3.11 is pulled from Docker Hub.
base_image: {image}

# Run once in each new sandbox before it is handed out: python (the default) runs it with the image's
# python3, shell with /bin/sh. A python warm-up is what the zygote preloads, e.g. heavy imports.
# warmup_language: python
# warmup_script: |
#   import json

resources:
  default_cpu: 1         # CPUs a sandbox gets unless its request asks for more
  default_memory: 512    # MiB
  max_cpu: 2             # the most a request may ask for
  max_memory: 2048       # MiB

# Environment of every process in the sandbox.
# env:
#   LANG: C.UTF-8

# Absolute working directory of commands.
# workdir: /home/sandbox

pool:
  size: 0                # warm sandboxes the server keeps ready (at most 64)

# Lifetime limit of a sandbox: 30s, 10m, 1h30m.
# timeout: 10m
"#
    )
}

/// `name` made into a valid id: lower case, runs of other characters become one `-`.
fn id_from_name(name: &str) -> String {
    let mut id = String::new();
    for c in name.chars() {
        match c {
            'a'..='z' | '0'..='9' => id.push(c),
            'A'..='Z' => id.push(c.to_ascii_lowercase()),
            _ if !id.is_empty() && !id.ends_with('-') => id.push('-'),
            _ => {}
        }
    }
    id.truncate(63);
    let id = id.trim_end_matches('-');
    match id.is_empty() {
        true => "my-template".to_string(),
        false => id.to_string(),
    }
}

/// A YAML double-quoted scalar (JSON's string syntax is a subset of it).
fn quote(text: &str) -> String {
    serde_json::to_string(text).expect("a string always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PYTHON_DS: &str = "id: python-ds
name: Python Data Science
base_image: python:3.11-slim
warmup_script: |
  import numpy, pandas
resources: {default_cpu: 2, default_memory: 4096, max_cpu: 8, max_memory: 32768}
";

    fn error(text: &str) -> TemplateError {
        parse_template(text, "t.yaml").expect_err("should be refused")
    }

    #[test]
    fn test_parse_template_reads_the_documented_example() {
        let t = parse_template(PYTHON_DS, "python-ds.yaml").unwrap();
        assert_eq!(t.id, "python-ds");
        assert_eq!(t.base_image, "python:3.11-slim");
        assert_eq!(t.warmup_language, Some(WarmupLanguage::Python));
        assert_eq!(
            t.warmup(),
            Some((WarmupLanguage::Python, "import numpy, pandas\n"))
        );
        assert_eq!(
            t.resources,
            TemplateResources {
                default_cpu: 2.0,
                default_memory: 4096,
                max_cpu: 8.0,
                max_memory: 32768
            }
        );
        assert_eq!(t.pool.size, 0);
    }

    #[test]
    fn test_missing_resources_get_defaults_and_max_follows_default() {
        let t = parse_template("id: a\nname: A\nbase_image: alpine\n", "a.yaml").unwrap();
        assert_eq!(
            t.resources,
            TemplateResources {
                default_cpu: 1.0,
                default_memory: 512,
                max_cpu: 1.0,
                max_memory: 512
            }
        );
        let t = parse_template(
            "id: a\nname: A\nbase_image: alpine\nresources: {default_cpu: 4, max_memory: 256}\n",
            "a.yaml",
        )
        .unwrap();
        assert_eq!((t.resources.max_cpu, t.resources.default_memory), (4.0, 256));
    }

    #[test]
    fn test_json_is_accepted() {
        let t = parse_template(
            r#"{"id": "j", "name": "J", "base_image": "julia:1.10", "pool": {"size": 2}, "timeout": "10m"}"#,
            "j.json",
        )
        .unwrap();
        assert_eq!(t.pool.size, 2);
        assert_eq!(t.timeout(), Some(Duration::from_secs(600)));
    }

    #[test]
    fn test_unknown_key_names_file_line_column_and_key() {
        let text = PYTHON_DS.replace("resources:", "resorces:");
        let e = error(&text);
        assert_eq!(e.location, Some((6, 1)), "{e}");
        assert_eq!(e.key.as_deref(), Some("resorces"));
        let shown = e.to_string();
        assert!(
            shown.starts_with("t.yaml:6:1: unknown field `resorces`, expected one of"),
            "{shown}"
        );
    }

    #[test]
    fn test_nested_unknown_key_names_its_path() {
        let text = "id: a\nname: A\nbase_image: alpine\nresources:\n  default_cpu: 1\n  defualt_memory: 3\n";
        let e = error(text);
        assert_eq!(e.location, Some((6, 3)), "{e}");
        assert_eq!(e.key.as_deref(), Some("resources.defualt_memory"));
        assert!(
            e.to_string()
                .contains("resources: unknown field `defualt_memory`"),
            "{e}"
        );
    }

    #[test]
    fn test_malformed_yaml_has_a_location() {
        let e = error("id: a\nname: [unclosed\nbase_image: x\n");
        assert!(e.location.is_some(), "{e}");
        assert!(e.to_string().starts_with("t.yaml:"), "{e}");
        assert!(!e.to_string().contains("at line"), "location is given once: {e}");
    }

    #[test]
    fn test_wrong_type_names_the_key() {
        let e = error("id: a\nname: A\nbase_image: alpine\nresources:\n  default_cpu: two\n");
        assert_eq!(e.location.map(|l| l.0), Some(5), "{e}");
        assert!(e.to_string().contains("resources.default_cpu"), "{e}");
    }

    #[test]
    fn test_missing_required_key_is_named() {
        let e = error("id: a\nname: A\n");
        assert!(e.to_string().contains("missing field `base_image`"), "{e}");
    }

    #[test]
    fn test_bad_id_points_at_the_key() {
        let e = error("# a comment mentioning id: here\nname: A\nid: Python_DS\nbase_image: alpine\n");
        assert_eq!(e.location, Some((3, 1)), "{e}");
        assert_eq!(e.key.as_deref(), Some("id"));
        assert!(
            e.to_string().starts_with("t.yaml:3:1: id 'Python_DS' is invalid"),
            "{e}"
        );
        for id in ["", "-a", "a_b", "A", &"a".repeat(64)] {
            assert!(!valid_id(id), "{id}");
        }
        assert!(valid_id("0-a") && valid_id(&"a".repeat(63)));
    }

    #[test]
    fn test_default_above_max_points_at_the_default() {
        let e = error("id: a\nname: A\nbase_image: alpine\nresources:\n  max_cpu: 2\n  default_cpu: 4\n");
        assert_eq!(e.location, Some((6, 3)), "{e}");
        assert_eq!(e.key.as_deref(), Some("resources.default_cpu"));
        assert!(e.message.contains("more than resources.max_cpu (2)"), "{e}");
        let e =
            error("id: a\nname: A\nbase_image: alpine\nresources: {default_memory: 1024, max_memory: 512}\n");
        assert_eq!(e.location, Some((4, 13)), "{e}");
    }

    #[test]
    fn test_semantic_errors_in_json_are_located() {
        let e = error(
            "{\n  \"id\": \"a\", \"name\": \"A\", \"base_image\": \"x\",\n  \"pool\": {\"size\": 65}\n}",
        );
        assert_eq!(e.location, Some((3, 12)), "{e}");
        assert!(e.message.contains("pool.size 65 is more than 64"), "{e}");
    }

    #[test]
    fn test_field_rules_are_enforced() {
        let base = "id: a\nname: A\nbase_image: alpine\n";
        let cases = [
            ("base_image: ''\nid: a\nname: A\n", "base_image"),
            ("id: a\nname: A\nbase_image: python 3\n", "base_image"),
            ("id: a\nname: ' '\nbase_image: x\n", "name"),
            (&format!("{base}warmup_language: shell\n"), "warmup_language"),
            (
                &format!("{base}warmup_language: ruby\nwarmup_script: x\n"),
                "warmup_language",
            ),
            (&format!("{base}warmup_script: '  '\n"), "warmup_script"),
            (
                &format!("{base}resources: {{default_cpu: 0}}\n"),
                "resources.default_cpu",
            ),
            (
                &format!("{base}resources: {{max_cpu: 65}}\n"),
                "resources.max_cpu",
            ),
            (
                &format!("{base}resources: {{default_memory: 0}}\n"),
                "resources.default_memory",
            ),
            (
                &format!("{base}resources: {{default_memory: -1}}\n"),
                "resources.default_memory",
            ),
            (&format!("{base}workdir: work\n"), "workdir"),
            (&format!("{base}env: {{'A=B': x}}\n"), "env"),
            (&format!("{base}pool: {{size: 65}}\n"), "pool.size"),
            (&format!("{base}timeout: soon\n"), "timeout"),
            (&format!("{base}timeout: 8d\n"), "timeout"),
            (&format!("{base}timeout: 200h\n"), "timeout"),
        ];
        for (text, key) in cases {
            let e = error(text);
            assert!(e.to_string().contains(key), "{text}: {e}");
            assert!(e.location.is_some(), "{text}: {e}");
        }
    }

    #[test]
    fn test_shell_warmup_and_full_shape_round_trip() {
        let text = "id: r\nname: R\ndescription: stats\nbase_image: r-base:4.4.1\nwarmup_language: shell\n\
                    warmup_script: |\n  Rscript -e 'library(stats)'\n  echo ok\nenv: {LANG: C.UTF-8}\n\
                    workdir: /home/r\npool: {size: 3}\ntimeout: 1h30m\n";
        let t = parse_template(text, "r.yaml").unwrap();
        assert_eq!(t.warmup().map(|w| w.0), Some(WarmupLanguage::Shell));
        assert_eq!(t.timeout(), Some(Duration::from_secs(5400)));
        assert_eq!(parse_template(&t.to_yaml(), "again.yaml").unwrap(), t);
        assert_eq!(parse_template(&t.to_json(), "again.json").unwrap(), t);
        let stored: Template = serde_json::from_str(&t.to_json()).unwrap();
        assert_eq!(stored, t);
    }

    #[test]
    fn test_init_template_yaml_is_a_valid_template() {
        let t = parse_template(&init_template_yaml("my-python", "python:3.11"), "init.yaml").unwrap();
        assert_eq!(
            (t.id.as_str(), t.base_image.as_str()),
            ("my-python", "python:3.11")
        );
        let t = parse_template(
            &init_template_yaml("My \"Fancy\": Env!", "ghcr.io/a/b@sha256:00"),
            "i",
        )
        .unwrap();
        assert_eq!(
            (t.id.as_str(), t.name.as_str()),
            ("my-fancy-env", "My \"Fancy\": Env!")
        );
        assert_eq!(id_from_name("???"), "my-template");
        assert!(parse_template(&init_template_yaml("x", "bad image"), "i").is_err());
    }

    #[test]
    fn test_durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("45"), Some(Duration::from_secs(45)));
        for bad in ["", "0s", "x", "10 m", "-5s", "5d"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn test_every_shipped_template_parses() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../templates");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if !matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy();
            let t = parse_template(&text, &name).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(format!("{}.yaml", t.id), name, "file names follow ids");
            seen += 1;
        }
        assert!(seen >= 4, "expected the four seed templates in {}", dir.display());
    }
}
