//! Usage and cost: what each sandbox used (CPU-seconds, memory GiB-seconds, egress, tool calls, snapshot
//! bytes), sampled while it runs and completed when it ends, and the optional [`PriceTable`] that turns
//! usage into cost. The wire types are here too; the handlers are in `routes/usage.rs`.
//!
//! Data flow: the enforcement loop reads every running local sandbox's shim `status` each interval and
//! hands the counters to [`sample`] (no extra shim calls); `sandboxes::Manager::finalize` calls [`finish`]
//! with the shim's result record (its CPU time and peak memory). Both write `sandbox_usage` through
//! [`tartarus_store::Store::record_usage`], which keeps records as long as the sandbox records themselves.

use serde::{Deserialize, Serialize};
use tartarus_store::{SandboxRecord, Store, UsageRecord, UsageSample};
use utoipa::ToSchema;

/// Prices per unit of usage (`tartarus server --price-table FILE`, JSON); units not named cost nothing.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceTable {
    /// The currency the prices are in (shown with every cost); default `USD`.
    #[serde(default = "default_currency")]
    pub currency: String,
    #[serde(default)]
    pub cpu_second: f64,
    #[serde(default)]
    pub memory_gib_second: f64,
    /// Per GiB sent out of sandboxes.
    #[serde(default)]
    pub egress_gib: f64,
    #[serde(default)]
    pub tool_call: f64,
    /// Per GiB of snapshots held.
    #[serde(default)]
    pub snapshot_gib: f64,
}

fn default_currency() -> String {
    "USD".to_string()
}

/// Why a price table was refused.
#[derive(Debug, thiserror::Error)]
pub enum PriceTableError {
    #[error("reading the price table {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the price table {path}: {message}")]
    Invalid { path: String, message: String },
}

impl PriceTable {
    /// Reads a price table (JSON) from `path`; negative or non-finite prices are refused.
    pub fn load(path: &std::path::Path) -> Result<PriceTable, PriceTableError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PriceTableError::Read {
            path: shown.clone(),
            source,
        })?;
        let table: PriceTable = serde_json::from_str(&text).map_err(|e| PriceTableError::Invalid {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        let prices = [
            ("cpu_second", table.cpu_second),
            ("memory_gib_second", table.memory_gib_second),
            ("egress_gib", table.egress_gib),
            ("tool_call", table.tool_call),
            ("snapshot_gib", table.snapshot_gib),
        ];
        if let Some((name, price)) = prices.iter().find(|(_, p)| !p.is_finite() || *p < 0.0) {
            return Err(PriceTableError::Invalid {
                path: shown,
                message: format!("{name} is {price}: prices must be finite and not negative"),
            });
        }
        Ok(table)
    }

    /// What `usage` costs at these prices.
    pub fn cost(&self, usage: &Totals) -> Cost {
        let gib = (1u64 << 30) as f64;
        let cpu = usage.cpu_seconds * self.cpu_second;
        let memory = usage.memory_gib_seconds * self.memory_gib_second;
        let egress = usage.egress_bytes as f64 / gib * self.egress_gib;
        let tool_calls = usage.tool_calls as f64 * self.tool_call;
        let snapshots = usage.snapshot_bytes as f64 / gib * self.snapshot_gib;
        Cost {
            currency: self.currency.clone(),
            total: cpu + memory + egress + tool_calls + snapshots,
            cpu,
            memory,
            egress,
            tool_calls,
            snapshots,
        }
    }
}

/// Usage turned into money by the server's price table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Cost {
    pub currency: String,
    pub total: f64,
    pub cpu: f64,
    pub memory: f64,
    pub egress: f64,
    pub tool_calls: f64,
    pub snapshots: f64,
}

/// Amounts of usage, summed over one sandbox or many.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Totals {
    /// CPU time of every process in the sandbox (for a microVM: of its VMM).
    pub cpu_seconds: f64,
    /// Memory in use integrated over time, from readings every enforcement interval.
    pub memory_gib_seconds: f64,
    /// Bytes sent out (0 where the lane does not count egress: see `egress_counted`).
    pub egress_bytes: u64,
    /// Tool calls through the gateway (one signed receipt each).
    pub tool_calls: u64,
    /// Bytes of snapshots held (0: sandboxes have no snapshots yet).
    pub snapshot_bytes: u64,
}

impl Totals {
    fn add(&mut self, other: &Totals) {
        self.cpu_seconds += other.cpu_seconds;
        self.memory_gib_seconds += other.memory_gib_seconds;
        self.egress_bytes = self.egress_bytes.saturating_add(other.egress_bytes);
        self.tool_calls = self.tool_calls.saturating_add(other.tool_calls);
        self.snapshot_bytes = self.snapshot_bytes.saturating_add(other.snapshot_bytes);
    }
}

/// What one sandbox used (`GET /v1/sandboxes/{id}/usage`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SandboxUsage {
    pub sandbox: String,
    pub tenant: String,
    /// Still starting or running: the numbers grow (memory is carried to now at the last reading).
    pub live: bool,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    #[serde(flatten)]
    pub totals: Totals,
    /// The last memory reading, in bytes.
    pub memory_bytes: Option<u64>,
    pub peak_memory_bytes: Option<u64>,
    /// Whether the lane counts egress for this sandbox (else `egress_bytes` is 0 by absence).
    pub egress_counted: bool,
    /// When the counters were last read (ms since the epoch); null: not yet.
    pub sampled_ms: Option<i64>,
    /// With a price table on the server: what this costs.
    pub cost: Option<Cost>,
}

/// One tenant's totals (`GET /v1/usage`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TenantUsage {
    pub tenant: String,
    /// Sandboxes counted.
    pub sandboxes: u64,
    #[serde(flatten)]
    pub totals: Totals,
    pub cost: Option<Cost>,
}

/// `GET /v1/usage`: per tenant, and per sandbox (newest first, at most `limit`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageReport {
    /// Sandboxes live at some time at or after this (ms since the epoch) are counted, whole.
    pub since_ms: i64,
    pub tenants: Vec<TenantUsage>,
    pub sandboxes: Vec<SandboxUsage>,
}

/// The API view of a stored usage record at `now_ms`.
pub fn view(record: &UsageRecord, now_ms: i64, prices: Option<&PriceTable>) -> SandboxUsage {
    let totals = Totals {
        cpu_seconds: record.cpu_usec as f64 / 1e6,
        memory_gib_seconds: record.memory_kib_ms_at(now_ms) as f64 / (1024.0 * 1024.0) / 1000.0,
        egress_bytes: record.egress_bytes.unwrap_or(0),
        tool_calls: record.tool_calls,
        snapshot_bytes: 0,
    };
    SandboxUsage {
        sandbox: record.sandbox.clone(),
        tenant: record.tenant.clone(),
        live: record.live,
        created_ms: record.created_ms,
        finished_ms: record.finished_ms,
        cost: prices.map(|p| p.cost(&totals)),
        totals,
        memory_bytes: record.memory_bytes,
        peak_memory_bytes: record.peak_memory_bytes,
        egress_counted: record.egress_bytes.is_some(),
        sampled_ms: record.sampled_ms,
    }
}

/// Sums `sandboxes` per tenant, tenants by name.
pub fn per_tenant(sandboxes: &[SandboxUsage], prices: Option<&PriceTable>) -> Vec<TenantUsage> {
    let mut tenants: std::collections::BTreeMap<&str, (u64, Totals)> = Default::default();
    for usage in sandboxes {
        let entry = tenants.entry(&usage.tenant).or_default();
        entry.0 += 1;
        entry.1.add(&usage.totals);
    }
    tenants
        .into_iter()
        .map(|(tenant, (count, totals))| TenantUsage {
            tenant: tenant.to_string(),
            sandboxes: count,
            cost: prices.map(|p| p.cost(&totals)),
            totals,
        })
        .collect()
}

/// Records one reading of a running sandbox's counters (from the enforcement loop's shim `status`).
pub async fn sample(store: &Store, record: &SandboxRecord, status: &tartarus_shim::protocol::Status) {
    let reading = UsageSample {
        cpu_usec: status.cpu_usec,
        memory_bytes: status.memory_bytes,
        peak_memory_bytes: None,
        egress_bytes: None,
    };
    let now = tartarus_store::now_ms();
    if let Err(e) = store
        .record_usage(&record.id, record.created_ms, now, &reading)
        .await
    {
        tracing::warn!(sandbox = %record.id, "recording usage failed: {}", tartarus_runtime::error_chain(&e));
    }
}

/// Completes a sandbox's usage when it ended: the result record's CPU time (if more than the last
/// reading) and peak memory, and the memory integral up to now. A sandbox that ended before its first
/// reading is charged its peak memory for its whole life (an upper bound).
pub async fn finish(store: &Store, id: &str, result: Option<&tartarus_shim::protocol::ResultRecord>) {
    let outcome = async {
        let Some(usage) = store.sandbox_usage(id, None).await? else {
            return Ok(());
        };
        let peak = result.map(|r| r.peak_memory_bytes).filter(|b| *b > 0);
        let reading = UsageSample {
            cpu_usec: result.map(|r| (r.cpu_ms.max(0.0) * 1000.0) as u64),
            memory_bytes: match usage.sampled_ms {
                None => peak,
                Some(_) => None,
            },
            peak_memory_bytes: peak,
            egress_bytes: None,
        };
        store
            .record_usage(id, usage.created_ms, tartarus_store::now_ms(), &reading)
            .await
    };
    if let Err(e) = outcome.await {
        tracing::warn!(sandbox = %id, "recording final usage failed: {}", tartarus_runtime::error_chain(&e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_multiplies_each_unit_by_its_price() {
        let prices = PriceTable {
            currency: "EUR".into(),
            cpu_second: 0.5,
            memory_gib_second: 0.25,
            egress_gib: 2.0,
            tool_call: 0.01,
            snapshot_gib: 0.0,
        };
        let usage = Totals {
            cpu_seconds: 2.0,
            memory_gib_seconds: 4.0,
            egress_bytes: 1 << 29,
            tool_calls: 3,
            snapshot_bytes: 0,
        };
        let cost = prices.cost(&usage);
        assert_eq!((cost.cpu, cost.memory, cost.egress), (1.0, 1.0, 1.0));
        assert!((cost.total - 3.03).abs() < 1e-9, "{cost:?}");
        assert_eq!(cost.currency, "EUR");
    }

    #[test]
    fn a_price_table_with_a_negative_price_or_an_unknown_unit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prices.json");
        std::fs::write(&path, r#"{"cpu_second": -1}"#).unwrap();
        let e = PriceTable::load(&path).unwrap_err().to_string();
        assert!(e.contains("cpu_second is -1"), "{e}");
        std::fs::write(&path, r#"{"gpu_second": 1}"#).unwrap();
        let e = PriceTable::load(&path).unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
        std::fs::write(&path, r#"{"cpu_second": 0.001}"#).unwrap();
        assert_eq!(PriceTable::load(&path).unwrap().currency, "USD");
    }
}
