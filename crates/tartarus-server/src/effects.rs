//! Verifiable effects in the server: the signing keys, the blob store, trace records of every sandbox run,
//! exec and tool call, and the episode each run is sealed into when it ends.
//!
//! Place in the data flow: the sandbox manager calls [`EffectsHooks`] when a sandbox starts belonging to
//! a tenant (the tool gateway opens, a `sandbox.start` record is written) and when its outcome is recorded
//! (`sandbox.end`, then the episode: every trace record, receipt and blob of the run, signed by the
//! server's current key). Exec handlers and the gateway append their own records through [`Effects::trace`].
//! Values that look secret are replaced by their hash before they are written ([`Redactor`]).
//! What an episode leaves behind is read back here too: its export ([`Effects::export`]), the facts
//! datasets query, and evaluators' keys.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use tartarus_effects::Signed;

use futures_util::future::BoxFuture;
use ipld_core::ipld::Ipld;
use tartarus_effects::dataset::FactValue;
use tartarus_effects::episode::{
    write_episode_car, Episode, EpisodeBundle, EpisodeKeys, Redactor, TraceRecord, EPISODE_FORMAT,
};
use tartarus_effects::{BlobStore, Cid, EffectsError, Keyring, PublicKeys, Quota};
use tartarus_runtime::{error_chain, SandboxSpec};
use tartarus_store::{EpisodeRecord, SandboxRecord, SignalRecord, Store, StoreError};

use crate::error::ApiError;
use crate::gateway::Gateways;

/// The server's effects state, shared by handlers.
#[derive(Clone)]
pub struct Effects {
    pub store: Store,
    /// The server's signing keys (`DATA_DIR/keys`): receipts and episodes.
    pub keyring: Arc<RwLock<Keyring>>,
    pub blobs: Arc<BlobStore>,
    /// Secret literals of every sandbox: the declared tools' header values (credentials).
    pub tool_secrets: Arc<RwLock<Vec<String>>>,
    /// Environment-variable name patterns whose values are secret.
    pub secret_names: Arc<[String]>,
    pub gateways: Gateways,
}

impl Effects {
    /// Opens the key directory and the blob store under the data directory.
    pub fn open(
        store: Store,
        data_dir: &Path,
        blob_quota: u64,
        secret_names: Vec<String>,
    ) -> Result<Self, String> {
        let keyring =
            Keyring::load_or_create(&data_dir.join("keys")).map_err(|e| format!("signing keys: {e}"))?;
        let blobs = BlobStore::open(data_dir.join("blobs"), Quota::bytes_per_tenant(blob_quota))
            .map_err(|e| format!("blob store: {e}"))?;
        let mut names = Redactor::default_name_patterns();
        names.extend(secret_names);
        Ok(Effects {
            gateways: Gateways::new(),
            store,
            keyring: Arc::new(RwLock::new(keyring)),
            blobs: Arc::new(blobs),
            tool_secrets: Arc::new(RwLock::new(Vec::new())),
            secret_names: names.into(),
        })
    }

    /// The redactor for one sandbox's records: the tools' credentials, and the values of its environment
    /// variables (and `extra_env`, an exec's) whose names look secret, are replaced by their hash wherever
    /// they appear.
    pub fn redactor(&self, spec_env: &[(String, String)], extra_env: &[(String, String)]) -> Redactor {
        let by_name = Redactor::new(Vec::new(), self.secret_names.to_vec());
        let mut secrets = match self.tool_secrets.read() {
            Ok(s) => s.clone(),
            Err(e) => e.into_inner().clone(),
        };
        secrets.extend(
            spec_env
                .iter()
                .chain(extra_env)
                .filter(|(name, _)| by_name.is_secret_name(name))
                .map(|(_, value)| value.clone()),
        );
        Redactor::new(secrets, self.secret_names.to_vec())
    }

    /// The redactor for a sandbox's record (its environment as created).
    pub fn redactor_for(&self, record: &SandboxRecord) -> Redactor {
        let spec: SandboxSpec = serde_json::from_str(&record.spec).unwrap_or_default();
        self.redactor(&spec.env, &[])
    }

    /// Signs with the current key.
    pub fn with_keyring<T>(&self, f: impl FnOnce(&Keyring) -> T) -> T {
        match self.keyring.read() {
            Ok(keyring) => f(&keyring),
            Err(e) => f(&e.into_inner()),
        }
    }

    /// Appends a trace record to `sandbox`'s run. Failures are logged, never fatal to the call traced.
    pub async fn trace(&self, sandbox: &str, tenant: &str, kind: &str, attrs: BTreeMap<String, Ipld>) {
        let at = tartarus_store::now_ms();
        let owned = (sandbox.to_string(), kind.to_string());
        let result = self
            .store
            .append_trace(sandbox, tenant, kind, at, move |seq| {
                TraceRecord::new(seq as u64, at as u64, &owned.1, &owned.0, attrs.clone())
                    .and_then(|record| record.to_bytes())
                    .map_err(|e| e.to_string())
            })
            .await;
        if let Err(e) = result {
            tracing::error!(
                sandbox,
                kind,
                "writing a trace record failed: {}",
                error_chain(&e)
            );
        }
    }

    /// Stores `bytes` as the tenant's blob; `None` (logged) when it cannot, e.g. over the tenant's quota.
    pub async fn put_blob(&self, tenant: &str, bytes: Vec<u8>) -> Option<Cid> {
        let blobs = Arc::clone(&self.blobs);
        let tenant = tenant.to_string();
        let result = tokio::task::spawn_blocking(move || blobs.put(&tenant, bytes.as_slice())).await;
        match result {
            Ok(Ok(put)) => Some(put.cid),
            Ok(Err(e)) => {
                tracing::warn!("keeping a trace blob failed: {}", error_chain(&e));
                None
            }
            Err(e) => {
                tracing::error!("keeping a trace blob failed: {}", error_chain(&e));
                None
            }
        }
    }

    /// The `sandbox.start` record.
    async fn record_start(&self, record: &SandboxRecord) {
        let spec: SandboxSpec = serde_json::from_str(&record.spec).unwrap_or_default();
        let redactor = self.redactor(&spec.env, &[]);
        let mut attrs = BTreeMap::new();
        attrs.insert("tenant".to_string(), Ipld::String(record.tenant.clone()));
        if let Some(template) = &record.template {
            attrs.insert("template".to_string(), Ipld::String(template.clone()));
        }
        let argv = spec.command.iter().map(|a| redactor.text(a)).collect();
        attrs.insert("cmd".to_string(), Ipld::List(argv));
        let env = spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), redactor.env(k, v)))
            .collect();
        attrs.insert("env".to_string(), Ipld::Map(env));
        let labels = record
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), Ipld::String(v.clone())))
            .collect();
        attrs.insert("labels".to_string(), Ipld::Map(labels));
        self.trace(&record.id, &record.tenant, "sandbox.start", attrs)
            .await;
    }

    /// Writes `sandbox.end` and seals the run into a signed episode.
    pub async fn seal(&self, id: &str) -> Result<Option<EpisodeRecord>, EpisodeError> {
        let Some(record) = self.store.sandbox(id, None).await? else {
            return Ok(None);
        };
        if self.store.episode(id, None).await?.is_some() {
            return Ok(None);
        }
        let mut attrs = BTreeMap::new();
        attrs.insert(
            "status".to_string(),
            Ipld::String(record.status.as_str().to_string()),
        );
        if let Some(code) = record.exit_code {
            attrs.insert("exit_code".to_string(), Ipld::Integer(code.into()));
        }
        if let Some(reason) = &record.reason {
            attrs.insert("reason".to_string(), self.redactor_for(&record).text(reason));
        }
        self.trace(id, &record.tenant, "sandbox.end", attrs).await;

        let rows = self.store.trace(id).await?;
        let receipts = self.store.receipts(None, Some(id)).await?;
        let mut blobs = std::collections::BTreeSet::new();
        let mut trace = Vec::with_capacity(rows.len());
        let mut tool_calls: BTreeMap<String, i64> = BTreeMap::new();
        for row in &rows {
            trace.push(Cid::of_encoded(&row.record).map_err(EpisodeError::TraceRecord)?);
            let decoded: TraceRecord =
                tartarus_effects::decode(&row.record).map_err(EpisodeError::TraceRecord)?;
            for value in decoded.attrs.values() {
                collect_blob_links(value, &mut blobs);
            }
            if decoded.kind == "tool_call" {
                if let Some(Ipld::String(tool)) = decoded.attrs.get("tool") {
                    *tool_calls.entry(tool.clone()).or_default() += 1;
                }
            }
        }
        let mut receipt_ids = Vec::with_capacity(receipts.len());
        for receipt in &receipts {
            receipt_ids.push(Cid::of_encoded(&receipt.envelope).map_err(EpisodeError::Receipt)?);
        }
        let started_at = record.created_ms.max(0) as u64;
        let finished_at = record.finished_ms.unwrap_or_else(tartarus_store::now_ms).max(0) as u64;
        let episode = Episode {
            format: EPISODE_FORMAT.to_string(),
            sandbox: record.id.clone(),
            tenant: record.tenant.clone(),
            template: record.template.clone(),
            started_at,
            finished_at: finished_at.max(started_at),
            outcome: record
                .reason
                .clone()
                .unwrap_or_else(|| record.status.as_str().to_string()),
            exit_code: record.exit_code,
            trace,
            receipts: receipt_ids,
            blobs: blobs.into_iter().collect(),
        };
        let envelope = self
            .with_keyring(|keyring| episode.sign(keyring))
            .and_then(|e| e.encode())
            .map_err(EpisodeError::Signing)?;
        let episode_id = Cid::of_encoded(&envelope).map_err(EpisodeError::Signing)?;
        let mut facts = serde_json::json!({
            "episode": episode_id.to_string(),
            "sandbox": record.id,
            "tenant": record.tenant,
            "outcome": episode.outcome,
            "status": record.status.as_str(),
            "started_at": episode.started_at,
            "finished_at": episode.finished_at,
            "duration_ms": episode.finished_at - episode.started_at,
            "tool_calls": tool_calls.values().sum::<i64>(),
        });
        if let Some(map) = facts.as_object_mut() {
            if let Some(template) = &record.template {
                map.insert("template".into(), template.clone().into());
            }
            if let Some(code) = record.exit_code {
                map.insert("exit_code".into(), code.into());
            }
            for (tool, n) in &tool_calls {
                map.insert(format!("tool.{tool}"), (*n).into());
            }
            for (k, v) in &record.labels {
                map.insert(format!("label.{k}"), v.clone().into());
            }
        }
        let sealed = EpisodeRecord {
            id: episode_id.to_string(),
            sandbox: record.id.clone(),
            tenant: record.tenant.clone(),
            created_ms: tartarus_store::now_ms(),
            envelope,
            facts: facts.to_string(),
        };
        self.store.insert_episode(&sealed).await?;
        Ok(Some(sealed))
    }
}

/// Blobs larger than this are left out of an episode export (the episode still names them).
const EXPORT_BLOB_LIMIT: u64 = 16 << 20;

/// Why an episode could not be sealed, or what it left behind could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum EpisodeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored trace record")]
    TraceRecord(#[source] EffectsError),
    #[error("stored receipt")]
    Receipt(#[source] EffectsError),
    #[error("signing the episode")]
    Signing(#[source] EffectsError),
    #[error("stored episode does not verify")]
    Unverified(#[source] EffectsError),
    #[error("stored key of evaluator '{name}'")]
    EvaluatorKey {
        name: String,
        #[source]
        source: PublicKeyError,
    },
    #[error("reading a blob")]
    Blob(#[source] tokio::task::JoinError),
    #[error("writing the export")]
    Export(#[source] EffectsError),
}

impl From<EpisodeError> for ApiError {
    fn from(e: EpisodeError) -> Self {
        match e {
            EpisodeError::Store(e) => e.into(),
            other => ApiError::internal(error_chain(&other)),
        }
    }
}

impl Effects {
    /// The keys registered for evaluator `name`.
    pub async fn evaluator_keys(&self, name: &str) -> Result<PublicKeys, EpisodeError> {
        let mut keys = PublicKeys::new();
        for row in self.store.evaluator_keys(Some(name)).await? {
            let key = parse_public_key(&row.public_key).map_err(|source| EpisodeError::EvaluatorKey {
                name: name.to_string(),
                source,
            })?;
            keys.insert(key);
        }
        Ok(keys)
    }

    /// The episode as a CAR file (effects-v1 §11): the signed episode, the trace records and receipts it
    /// lists, its signals, the blobs the tenant still holds up to [`EXPORT_BLOB_LIMIT`] and without
    /// secrets, and the public keys that signed them.
    pub async fn export(&self, episode: &EpisodeRecord) -> Result<Vec<u8>, EpisodeError> {
        let (_, payload) = self
            .with_keyring(|keys| Episode::verify(keys, &episode.envelope))
            .map_err(EpisodeError::Unverified)?;
        let listed = |bytes: &Vec<u8>, ids: &[Cid]| Cid::of_encoded(bytes).is_ok_and(|c| ids.contains(&c));
        let records: Vec<Vec<u8>> = self
            .store
            .trace(&episode.sandbox)
            .await?
            .into_iter()
            .map(|r| r.record)
            .filter(|bytes| listed(bytes, &payload.trace))
            .collect();
        let receipts: Vec<Vec<u8>> = self
            .store
            .receipts(None, Some(&episode.sandbox))
            .await?
            .into_iter()
            .map(|r| r.envelope)
            .filter(|bytes| listed(bytes, &payload.receipts))
            .collect();
        let signals = self.store.signals(Some(&episode.id), None).await?;
        let mut evaluators: BTreeMap<String, PublicKeys> = BTreeMap::new();
        for signal in &signals {
            if !evaluators.contains_key(&signal.evaluator) {
                let keys = self.evaluator_keys(&signal.evaluator).await?;
                evaluators.insert(signal.evaluator.clone(), keys);
            }
        }
        let redactor = match self.store.sandbox(&episode.sandbox, None).await? {
            Some(record) => self.redactor_for(&record),
            None => self.redactor(&[], &[]),
        };
        let mut blobs = Vec::new();
        for cid in &payload.blobs {
            let store = Arc::clone(&self.blobs);
            let (tenant, cid) = (episode.tenant.clone(), *cid);
            let bytes = tokio::task::spawn_blocking(move || match store.referenced_size(&tenant, &cid) {
                Ok(Some(size)) if size <= EXPORT_BLOB_LIMIT => {
                    let mut out = Vec::with_capacity(size as usize);
                    store.get(&cid, &mut out).ok().map(|_| out)
                }
                _ => None,
            })
            .await
            .map_err(EpisodeError::Blob)?;
            if let Some(bytes) = bytes.filter(|b| !redactor.contains_secret(b)) {
                blobs.push((cid, bytes));
            }
        }
        let bundle = EpisodeBundle {
            episode: episode.envelope.clone(),
            records,
            receipts,
            signals: signals.into_iter().map(|s| s.envelope).collect(),
            blobs,
            keys: EpisodeKeys {
                server: self.with_keyring(|k| k.public_keys().clone()),
                evaluators,
            },
        };
        let mut out = Vec::new();
        write_episode_car(&bundle, &mut out).map_err(EpisodeError::Export)?;
        Ok(out)
    }
}

/// An Ed25519 public key that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublicKeyError {
    #[error("public key '{key}' is not 64 hex digits")]
    NotHex { key: String },
    #[error("'{key}' is not an Ed25519 public key")]
    NotEd25519 { key: String },
}

/// An Ed25519 public key written as 64 hex digits.
pub fn parse_public_key(hex_key: &str) -> Result<ed25519_dalek::VerifyingKey, PublicKeyError> {
    let bytes: [u8; 32] = hex::decode(hex_key)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| PublicKeyError::NotHex {
            key: hex_key.to_string(),
        })?;
    ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| PublicKeyError::NotEd25519 {
        key: hex_key.to_string(),
    })
}

/// An episode's stored facts (a JSON object) plus `signal.<name>.score|label` from the latest of
/// `signals` of each name that is about it (`signals` in time order).
pub fn facts_with_signals(
    facts: &str,
    episode: &str,
    signals: &[SignalRecord],
) -> Result<serde_json::Value, serde_json::Error> {
    let mut value: serde_json::Value = serde_json::from_str(facts)?;
    if let Some(map) = value.as_object_mut() {
        // A later signal of the same name overwrites an earlier one.
        for signal in signals.iter().filter(|s| s.episode == episode) {
            if let Some(score) = signal.score {
                map.insert(format!("signal.{}.score", signal.name), score.into());
            }
            if let Some(label) = &signal.label {
                map.insert(format!("signal.{}.label", signal.name), label.clone().into());
            }
        }
    }
    Ok(value)
}

/// The facts a dataset query can filter on: strings, booleans and integers (anything else is left out).
pub fn fact_fields(facts: &serde_json::Value) -> BTreeMap<String, FactValue> {
    let Some(map) = facts.as_object() else {
        return BTreeMap::new();
    };
    map.iter()
        .filter_map(|(k, v)| {
            let value = match v {
                serde_json::Value::String(s) => FactValue::Text(s.clone()),
                serde_json::Value::Bool(b) => FactValue::Bool(*b),
                serde_json::Value::Number(n) => FactValue::Int(n.as_i64()?),
                _ => return None,
            };
            Some((k.clone(), value))
        })
        .collect()
}

/// Raw CIDs (blobs) linked anywhere in a trace value.
fn collect_blob_links(value: &Ipld, into: &mut std::collections::BTreeSet<Cid>) {
    match value {
        Ipld::Link(link) => {
            if let Ok(cid) = Cid::from_bytes(&link.to_bytes()) {
                if cid.codec() == tartarus_effects::Codec::Raw {
                    into.insert(cid);
                }
            }
        }
        Ipld::List(items) => items.iter().for_each(|v| collect_blob_links(v, into)),
        // A redacted value's hash names a secret, not a stored blob.
        Ipld::Map(map) if tartarus_effects::episode::redacted_cid(value).is_none() => {
            map.values().for_each(|v| collect_blob_links(v, into));
        }
        _ => {}
    }
}

/// A link to `cid` inside a trace record.
pub fn link(cid: &Cid) -> Ipld {
    match ipld_core::cid::Cid::try_from(cid.to_bytes().as_slice()) {
        Ok(c) => Ipld::Link(c),
        Err(_) => Ipld::String(cid.to_string()),
    }
}

/// The manager's lifecycle hooks: the gateway and the trace.
pub struct EffectsHooks {
    pub effects: Effects,
    pub manager: std::sync::Weak<crate::sandboxes::Manager>,
}

impl crate::sandboxes::Lifecycle for EffectsHooks {
    fn started<'a>(&'a self, record: &'a SandboxRecord, adopted: bool) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(manager) = self.manager.upgrade() {
                let dir = manager.gateway_dir(&record.id);
                if let Err(e) = self.effects.gateways.open(&self.effects, record, &dir) {
                    tracing::error!(sandbox = %record.id, "the tool gateway did not open: {}", error_chain(&e));
                }
            }
            if !adopted {
                self.effects.record_start(record).await;
            }
        })
    }

    fn ended<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.effects.gateways.close(id);
            if let Err(e) = self.effects.seal(id).await {
                tracing::error!(sandbox = %id, "sealing the episode failed: {}", error_chain(&e));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(id: &str, episode: &str, name: &str, score: Option<i64>, label: Option<&str>) -> SignalRecord {
        SignalRecord {
            id: id.to_string(),
            episode: episode.to_string(),
            tenant: "team-a".to_string(),
            evaluator: "grader".to_string(),
            name: name.to_string(),
            score,
            label: label.map(str::to_string),
            at_ms: 0,
            envelope: Vec::new(),
        }
    }

    fn verifying_key_hex() -> String {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        hex::encode(key.as_bytes())
    }

    #[test]
    fn test_a_public_key_is_64_hex_digits_of_an_ed25519_point() {
        let text = verifying_key_hex();
        let key = parse_public_key(&text).unwrap();
        assert_eq!(hex::encode(key.as_bytes()), text);
        assert_eq!(parse_public_key(&text.to_ascii_uppercase()).unwrap(), key);
    }

    #[test]
    fn test_a_public_key_of_the_wrong_length_or_not_hex_is_refused() {
        let text = verifying_key_hex();
        for bad in [
            &text[..62],
            &format!("{text}00"),
            &format!("zz{}", &text[2..]),
            "",
        ] {
            assert_eq!(
                parse_public_key(bad),
                Err(PublicKeyError::NotHex { key: bad.to_string() }),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn test_32_bytes_that_are_not_a_curve_point_are_refused() {
        // About half of all y coordinates have no point on the curve.
        let not_a_point = (0u8..=255)
            .map(|first| {
                let mut bytes = [0u8; 32];
                bytes[0] = first;
                hex::encode(bytes)
            })
            .find(|text| ed25519_dalek::VerifyingKey::from_bytes(&hex_bytes(text)).is_err())
            .expect("some y coordinate is off the curve");
        assert_eq!(
            parse_public_key(&not_a_point),
            Err(PublicKeyError::NotEd25519 {
                key: not_a_point.clone()
            })
        );
    }

    fn hex_bytes(text: &str) -> [u8; 32] {
        hex::decode(text).unwrap().try_into().unwrap()
    }

    #[test]
    fn test_the_latest_signal_of_each_name_about_the_episode_joins_its_facts() {
        let signals = [
            signal("s1", "ep1", "quality", Some(3), None),
            signal("s2", "ep2", "quality", Some(9), Some("other episode")),
            signal("s3", "ep1", "quality", Some(5), Some("good")),
            signal("s4", "ep1", "safety", None, Some("ok")),
        ];
        let facts = facts_with_signals(r#"{"status":"exited","tool_calls":2}"#, "ep1", &signals).unwrap();
        assert_eq!(
            facts,
            serde_json::json!({
                "status": "exited", "tool_calls": 2,
                "signal.quality.score": 5, "signal.quality.label": "good", "signal.safety.label": "ok",
            })
        );
        assert!(facts_with_signals("not json", "ep1", &signals).is_err());
    }

    #[test]
    fn test_datasets_filter_on_text_booleans_and_integers_only() {
        let facts = serde_json::json!({
            "status": "exited", "exit_code": 0, "replayed": true,
            "ratio": 0.5, "huge": u64::MAX, "none": null, "list": [1], "map": {"a": 1},
        });
        assert_eq!(
            fact_fields(&facts),
            BTreeMap::from([
                ("exit_code".to_string(), FactValue::Int(0)),
                ("replayed".to_string(), FactValue::Bool(true)),
                ("status".to_string(), FactValue::Text("exited".to_string())),
            ])
        );
        assert!(fact_fields(&serde_json::json!([1, 2])).is_empty());
    }
}
