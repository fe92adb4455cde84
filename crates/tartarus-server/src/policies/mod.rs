//! Policies in force (versioned in the store; see `routes::policies` for the API), admission of every
//! create against them ([`admission`]), the enforcement loop ([`enforcement`]), the classification hook
//! ([`classifier`]) and the event stream.

pub mod admission;
pub mod classifier;
pub mod enforcement;
pub mod isolation;

pub use admission::{admit, admit_copies, effective_policy, AdmissionFacts};
pub use classifier::classify;
pub use enforcement::{quarantine, spawn_enforcement};
pub use isolation::choose_runtime;

use std::sync::{Arc, RwLock};

use tartarus_policy::Policy;
use tartarus_store::NewEvent;

use crate::AppState;

/// The policies in force, loaded from the store at start and replaced on every change.
#[derive(Clone, Default)]
pub struct Policies(Arc<RwLock<Vec<Policy>>>);

impl Policies {
    pub async fn load(store: &tartarus_store::Store) -> Result<Policies, String> {
        let policies = Policies::default();
        policies.reload(store).await?;
        Ok(policies)
    }

    pub(crate) async fn reload(&self, store: &tartarus_store::Store) -> Result<(), String> {
        let mut loaded = Vec::new();
        for revision in store.current_policies().await.map_err(|e| e.to_string())? {
            let policy: Policy = serde_json::from_str(&revision.document).map_err(|e| {
                format!(
                    "stored policy '{}' revision {}: {e}",
                    revision.id, revision.revision
                )
            })?;
            loaded.push(policy);
        }
        if let Ok(mut current) = self.0.write() {
            *current = loaded;
        }
        Ok(())
    }

    fn snapshot(&self) -> Vec<Policy> {
        self.0.read().map(|p| p.clone()).unwrap_or_default()
    }
}

/// Records an event and publishes it on the bus (`enforcement.…`, `admission.rejected`, …); failures are
/// logged, never fatal.
pub async fn event(state: &AppState, event: NewEvent<'_>) {
    match state.store.record_event(&event).await {
        Ok(_) => crate::metrics::event_recorded(&event),
        Err(e) => tracing::error!("event write failed: {}", tartarus_runtime::error_chain(&e)),
    }
    let subject = match event.kind.strip_prefix(event.category) {
        Some(rest) if rest.starts_with('.') => event.kind.to_string(),
        _ => format!("{}.{}", event.category, event.kind),
    };
    let details = event
        .details
        .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok());
    state.events.publish(
        &subject,
        event.tenant,
        serde_json::json!({ "sandbox": event.sandbox, "message": event.message, "details": details }),
    );
}
