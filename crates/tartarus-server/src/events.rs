//! The server's side of the event bus (`tartarus-events`, docs/events.md): the bus chosen by
//! `--event-bus`, the publisher every handler and hook uses, and the lifecycle hooks that publish
//! `sandbox.created`, `sandbox.started` and `sandbox.ended` for local sandboxes.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::json;
use tartarus_events::{Event, EventBus, Publisher, Subject};
use tartarus_store::SandboxRecord;

/// Events waiting for the bus at most; past it, events are dropped and counted (`GET /healthz`).
pub const OUTBOX: usize = 10_000;

/// Where the server publishes.
#[derive(Clone)]
pub struct ServerEvents {
    pub bus: Arc<dyn EventBus>,
    publisher: Publisher,
}

impl ServerEvents {
    pub fn new(bus: Arc<dyn EventBus>) -> ServerEvents {
        let publisher = Publisher::spawn(bus.clone(), OUTBOX);
        ServerEvents { bus, publisher }
    }

    /// Publishes `subject` without waiting for the bus. A subject this server builds wrongly is logged,
    /// never a failure of the request that caused it.
    pub fn publish(&self, subject: &str, tenant: Option<&str>, data: serde_json::Value) {
        match Subject::new(subject) {
            Ok(subject) => self.publisher.publish(Event::new(subject, tenant, data)),
            Err(e) => tracing::error!(error = %e.chain(), "event bus: an event with an invalid subject"),
        }
    }

    /// `sandbox.created`, `sandbox.paused`, …: a sandbox's fields every such event has.
    pub fn sandbox(&self, kind: &str, record: &SandboxRecord, mut extra: serde_json::Value) {
        let mut data = json!({
            "sandbox": record.id,
            "template": record.template,
            "runtime": record.runtime,
            "node": record.node,
        });
        if let (Some(data), Some(extra)) = (data.as_object_mut(), extra.as_object_mut()) {
            data.append(extra);
        }
        self.publish(&format!("sandbox.{kind}"), Some(&record.tenant), data);
    }

    pub fn health(&self) -> tartarus_events::BusHealth {
        self.publisher.health()
    }
}

/// Lifecycle hooks that publish a local sandbox's `sandbox.created`, `sandbox.started` and `sandbox.ended`
/// around the hooks they wrap.
pub struct EventHooks {
    pub inner: Arc<dyn crate::sandboxes::Lifecycle>,
    pub events: ServerEvents,
    pub store: tartarus_store::Store,
}

impl crate::sandboxes::Lifecycle for EventHooks {
    fn started<'a>(&'a self, record: &'a SandboxRecord, adopted: bool) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.inner.started(record, adopted).await;
            // A local sandbox is created and started in one step; one on a node or from the queue is
            // published as created where it is placed.
            if !adopted {
                self.events.sandbox("created", record, json!({}));
                self.events.sandbox("started", record, json!({}));
            }
        })
    }

    fn ended<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.inner.ended(id).await;
            match self.store.sandbox(id, None).await {
                Ok(Some(record)) => {
                    let reason = record.reason.clone().unwrap_or_default();
                    self.events.sandbox(
                        "ended",
                        &record,
                        json!({
                            "status": record.status.as_str(),
                            "reason": reason,
                            "exit_code": record.exit_code,
                        }),
                    );
                    let enforced = match reason.as_str() {
                        "timeout" => Some("enforcement.timeout.kill"),
                        "oom" => Some("enforcement.resources.oom"),
                        _ => None,
                    };
                    if let Some(subject) = enforced {
                        self.events
                            .publish(subject, Some(&record.tenant), json!({ "sandbox": record.id }));
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::error!(
                    sandbox = id,
                    "sandbox.ended not published: {}",
                    tartarus_runtime::error_chain(&e)
                ),
            }
        })
    }
}
