//! What sandboxes used: CPU time, memory over time, egress, tool calls ([`Store::record_usage`],
//! [`Store::sandbox_usage`], [`Store::usage_of`]). Rows live in `sandbox_usage`, one per sandbox, removed
//! only with the sandbox's record.
//!
//! Memory is integrated as a left Riemann sum: each sample adds the previous reading times the time since
//! it, so a gap between samples (a paused sandbox, a busy server) is charged at the last reading. The first
//! sample charges its reading back to the sandbox's creation.

use sqlx::Row;

use crate::{Store, StoreError};

/// One reading of a sandbox's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsageSample {
    /// The lane's cumulative CPU time, if it reports one; the stored value never goes down.
    pub cpu_usec: Option<u64>,
    /// Memory in use now, if the lane reports it.
    pub memory_bytes: Option<u64>,
    /// Highest memory use seen, if known (the result record's, at the end).
    pub peak_memory_bytes: Option<u64>,
    /// Cumulative bytes sent out, if the lane counts them.
    pub egress_bytes: Option<u64>,
}

/// What one sandbox used, as stored, with what is derived from other tables (tool calls).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    pub sandbox: String,
    pub tenant: String,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    /// Whether the sandbox was still starting or running when read.
    pub live: bool,
    pub cpu_usec: u64,
    pub memory_kib_ms: u64,
    pub memory_bytes: Option<u64>,
    /// When the counters were last read; `None`: never (no row yet).
    pub sampled_ms: Option<i64>,
    pub peak_memory_bytes: Option<u64>,
    pub egress_bytes: Option<u64>,
    /// Tool calls through the gateway (one receipt each).
    pub tool_calls: u64,
}

impl UsageRecord {
    /// Memory integrated up to `now_ms`: a live sandbox's last reading is carried from its sample to now.
    pub fn memory_kib_ms_at(&self, now_ms: i64) -> u64 {
        match (self.live, self.memory_bytes, self.sampled_ms) {
            (true, Some(bytes), Some(at)) => self
                .memory_kib_ms
                .saturating_add(bytes.saturating_mul(now_ms.saturating_sub(at).max(0) as u64) / 1024),
            _ => self.memory_kib_ms,
        }
    }
}

fn to_db(value: Option<u64>) -> Option<i64> {
    value.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

fn from_db(value: Option<i64>) -> Option<u64> {
    value.map(|v| v.max(0) as u64)
}

const USAGE_SELECT: &str = "SELECT s.id, s.tenant, s.created_ms, s.finished_ms, s.status, \
     u.cpu_usec, u.memory_kib_ms, u.memory_bytes, u.sampled_ms, u.peak_memory_bytes, u.egress_bytes, \
     (SELECT COUNT(*) FROM receipts r WHERE r.sandbox = s.id) AS tool_calls \
     FROM sandboxes s LEFT JOIN sandbox_usage u ON u.id = s.id";

fn decode_usage(row: &sqlx::any::AnyRow) -> Result<UsageRecord, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(UsageRecord {
        sandbox: row.try_get("id")?,
        tenant: row.try_get("tenant")?,
        created_ms: row.try_get("created_ms")?,
        finished_ms: row.try_get("finished_ms")?,
        live: matches!(status.as_str(), "starting" | "running"),
        cpu_usec: from_db(row.try_get("cpu_usec")?).unwrap_or(0),
        memory_kib_ms: from_db(row.try_get("memory_kib_ms")?).unwrap_or(0),
        memory_bytes: from_db(row.try_get("memory_bytes")?),
        sampled_ms: row.try_get("sampled_ms")?,
        peak_memory_bytes: from_db(row.try_get("peak_memory_bytes")?),
        egress_bytes: from_db(row.try_get("egress_bytes")?),
        tool_calls: from_db(row.try_get("tool_calls")?).unwrap_or(0),
    })
}

impl Store {
    /// Adds a reading of sandbox `id`'s counters taken at `now_ms` (the sandbox was created at
    /// `created_ms`): CPU and egress keep the highest value seen, memory is integrated from the previous
    /// reading (or from `created_ms` for the first).
    pub async fn record_usage(
        &self,
        id: &str,
        created_ms: i64,
        now_ms: i64,
        sample: &UsageSample,
    ) -> Result<(), StoreError> {
        let first_memory = sample
            .memory_bytes
            .map(|bytes| bytes.saturating_mul(now_ms.saturating_sub(created_ms).max(0) as u64) / 1024)
            .unwrap_or(0);
        sqlx::query(
            "INSERT INTO sandbox_usage (id, cpu_usec, memory_kib_ms, memory_bytes, sampled_ms, peak_memory_bytes, \
             egress_bytes) VALUES ($1, COALESCE($2, 0), $3, $4, $5, $6, $7) \
             ON CONFLICT (id) DO UPDATE SET \
             cpu_usec = CASE WHEN excluded.cpu_usec > sandbox_usage.cpu_usec THEN excluded.cpu_usec \
                        ELSE sandbox_usage.cpu_usec END, \
             memory_kib_ms = sandbox_usage.memory_kib_ms + \
                 CASE WHEN excluded.sampled_ms > sandbox_usage.sampled_ms \
                      THEN COALESCE(sandbox_usage.memory_bytes, 0) * (excluded.sampled_ms - sandbox_usage.sampled_ms) / 1024 \
                      ELSE 0 END, \
             memory_bytes = COALESCE(excluded.memory_bytes, sandbox_usage.memory_bytes), \
             sampled_ms = CASE WHEN excluded.sampled_ms > sandbox_usage.sampled_ms THEN excluded.sampled_ms \
                          ELSE sandbox_usage.sampled_ms END, \
             peak_memory_bytes = CASE WHEN sandbox_usage.peak_memory_bytes IS NULL \
                                        OR excluded.peak_memory_bytes > sandbox_usage.peak_memory_bytes \
                                 THEN COALESCE(excluded.peak_memory_bytes, sandbox_usage.peak_memory_bytes) \
                                 ELSE sandbox_usage.peak_memory_bytes END, \
             egress_bytes = CASE WHEN sandbox_usage.egress_bytes IS NULL \
                                   OR excluded.egress_bytes > sandbox_usage.egress_bytes \
                            THEN COALESCE(excluded.egress_bytes, sandbox_usage.egress_bytes) \
                            ELSE sandbox_usage.egress_bytes END",
        )
        .bind(id)
        .bind(to_db(sample.cpu_usec))
        .bind(i64::try_from(first_memory).unwrap_or(i64::MAX))
        .bind(to_db(sample.memory_bytes))
        .bind(now_ms)
        .bind(to_db(sample.peak_memory_bytes))
        .bind(to_db(sample.egress_bytes))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// What sandbox `id` used; with `tenant`, only if it belongs to that tenant.
    pub async fn sandbox_usage(
        &self,
        id: &str,
        tenant: Option<&str>,
    ) -> Result<Option<UsageRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "{USAGE_SELECT} WHERE s.id = $1 AND ($2 IS NULL OR s.tenant = $2)"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode_usage).transpose()
    }

    /// What the sandboxes of `tenant` (all tenants: `None`) used that were live at some time at or after
    /// `since_ms`: not yet ended, or ended then. Newest first.
    pub async fn usage_of(
        &self,
        tenant: Option<&str>,
        since_ms: i64,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "{USAGE_SELECT} WHERE ($1 IS NULL OR s.tenant = $1) \
             AND (s.finished_ms IS NULL OR s.finished_ms >= $2) ORDER BY s.created_ms DESC, s.id"
        ))
        .bind(tenant)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_usage).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SandboxRecord, SandboxStatus};

    fn record(id: &str, tenant: &str, created_ms: i64) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            tenant: tenant.into(),
            status: SandboxStatus::Running,
            template: None,
            spec: "{}".into(),
            labels: Default::default(),
            created_ms,
            finished_ms: None,
            exit_code: None,
            reason: None,
            shim_pid: None,
            dir: format!("/tmp/{id}"),
            paused: false,
            node: None,
            remote_id: None,
            placement: None,
            runtime: "process".into(),
            runtime_reason: None,
            hibernated_to: None,
        }
    }

    #[tokio::test]
    async fn usage_integrates_memory_keeps_the_highest_cpu_and_is_scoped_by_tenant() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            store.insert_sandbox(&record("sb_u1", "a", 1_000)).await.unwrap();
            store.insert_sandbox(&record("sb_u2", "b", 1_000)).await.unwrap();
            let mib = 1u64 << 20;
            let sample = |cpu, memory| UsageSample {
                cpu_usec: Some(cpu),
                memory_bytes: Some(memory),
                ..UsageSample::default()
            };
            // 1 MiB from creation (1 s) to the first sample at 2 s: 1024 KiB·s.
            store
                .record_usage("sb_u1", 1_000, 2_000, &sample(500, mib))
                .await
                .unwrap();
            // 1 MiB for 1 s more, then 2 MiB readings.
            store
                .record_usage("sb_u1", 1_000, 3_000, &sample(400, 2 * mib))
                .await
                .unwrap();
            let usage = store.sandbox_usage("sb_u1", Some("a")).await.unwrap().unwrap();
            assert_eq!(usage.cpu_usec, 500, "a lower CPU reading never lowers the total");
            assert_eq!(usage.memory_kib_ms, 2 * 1024 * 1000);
            // Live: carried on at the last reading (2 MiB) to the time asked.
            assert_eq!(usage.memory_kib_ms_at(4_000), 2 * 1024 * 1000 + 2 * 1024 * 1000);
            assert!(usage.live && usage.tool_calls == 0 && usage.egress_bytes.is_none());

            assert!(
                store.sandbox_usage("sb_u1", Some("b")).await.unwrap().is_none(),
                "another tenant's usage is not found"
            );
            let never_sampled = store.sandbox_usage("sb_u2", None).await.unwrap().unwrap();
            assert_eq!((never_sampled.cpu_usec, never_sampled.sampled_ms), (0, None));

            let of_a = store.usage_of(Some("a"), 0).await.unwrap();
            assert_eq!(
                of_a.iter().map(|u| u.sandbox.as_str()).collect::<Vec<_>>(),
                ["sb_u1"]
            );
            assert_eq!(store.usage_of(None, 0).await.unwrap().len(), 2);
        }
    }
}
