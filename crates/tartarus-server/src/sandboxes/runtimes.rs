//! The isolation lanes this machine offers the server's sandboxes: probed once at start-up (bounded in
//! time by the lanes module), and asked per request whether each can honour the spec. The policy's
//! [`tartarus_policy::choose_runtime`] picks among the offers; the shim opens the chosen lane by name.

use tartarus_policy::LaneOffer;
use tartarus_runtime::lanes::{self, LaneConfig, LaneName, LaneReport};
use tartarus_runtime::{Runtime, SandboxSpec};

/// The lanes of this machine, with a runtime opened for each available one (to ask what it supports).
pub struct Runtimes {
    reports: Vec<LaneReport>,
    opened: Vec<(LaneName, Box<dyn Runtime + Send + Sync>)>,
}

impl Runtimes {
    /// Probes every lane (blocking: call it off the async runtime).
    pub fn probe(config: &LaneConfig) -> Self {
        let reports = lanes::probe(config);
        let opened = reports
            .iter()
            .filter(|r| r.available)
            .filter_map(|r| match lanes::open(r.name, config) {
                Ok(runtime) => Some((r.name, runtime)),
                Err(e) => {
                    tracing::warn!("the {} lane probed available but did not open: {e}", r.name);
                    None
                }
            })
            .collect();
        Runtimes { reports, opened }
    }

    /// What `tartarus runtimes` and `GET /v1/runtimes` show.
    pub fn reports(&self) -> &[LaneReport] {
        &self.reports
    }

    /// Each lane with why this host cannot run it, or why it cannot honour `spec`.
    pub fn offers(&self, spec: &SandboxSpec) -> Vec<LaneOffer> {
        self.reports
            .iter()
            .map(|report| {
                let opened = self.opened.iter().find(|(name, _)| *name == report.name);
                let unavailable = match (report.available, opened) {
                    (true, Some(_)) => None,
                    (true, None) => Some("the lane did not open on this server (see its log)".to_string()),
                    (false, _) => Some(
                        report
                            .reason
                            .clone()
                            .unwrap_or_else(|| "not available on this host".to_string()),
                    ),
                };
                let unsupported =
                    opened.and_then(|(_, runtime)| runtime.supports(spec).err().map(|e| e.to_string()));
                LaneOffer {
                    lane: report.name,
                    unavailable,
                    unsupported,
                    emulated: report.emulated.clone(),
                }
            })
            .collect()
    }
}
