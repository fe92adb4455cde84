//! Resource amounts: what a node has, what is reserved on it, and what a request needs, in integers so that
//! accounting is exact and decisions are reproducible.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One kind of resource, in the order filters and messages name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    /// CPU, in thousandths of a core.
    Cpu,
    /// Memory, in bytes.
    Memory,
    /// Whole GPUs.
    Gpus,
}

impl ResourceKind {
    /// Every kind, in naming order.
    pub const ALL: [ResourceKind; 3] = [ResourceKind::Cpu, ResourceKind::Memory, ResourceKind::Gpus];

    /// `cpu`, `memory` or `gpus`.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Cpu => "cpu",
            ResourceKind::Memory => "memory",
            ResourceKind::Gpus => "gpus",
        }
    }

    /// An amount of this kind for people: `1500m`, `512 MiB`, `2`.
    pub fn format_amount(self, amount: u64) -> String {
        match self {
            ResourceKind::Cpu => format!("{amount}m"),
            ResourceKind::Memory => format_bytes(amount),
            ResourceKind::Gpus => amount.to_string(),
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// CPU, memory and GPUs: a node's capacity, the sum reserved on it, or what a request needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in thousandths of a core (`1500` is one and a half cores).
    #[serde(default)]
    pub cpu_millis: u64,
    /// Memory in bytes.
    #[serde(default)]
    pub memory_bytes: u64,
    /// Whole GPUs.
    #[serde(default)]
    pub gpus: u32,
}

impl Resources {
    /// Nothing.
    pub const ZERO: Resources = Resources {
        cpu_millis: 0,
        memory_bytes: 0,
        gpus: 0,
    };

    /// The given amounts.
    pub const fn new(cpu_millis: u64, memory_bytes: u64, gpus: u32) -> Self {
        Resources {
            cpu_millis,
            memory_bytes,
            gpus,
        }
    }

    /// The amount of one kind (GPUs widened to `u64`).
    pub fn get(self, kind: ResourceKind) -> u64 {
        match kind {
            ResourceKind::Cpu => self.cpu_millis,
            ResourceKind::Memory => self.memory_bytes,
            ResourceKind::Gpus => u64::from(self.gpus),
        }
    }

    /// The sum, or `None` if any kind overflows.
    pub fn checked_add(self, other: Resources) -> Option<Resources> {
        Some(Resources {
            cpu_millis: self.cpu_millis.checked_add(other.cpu_millis)?,
            memory_bytes: self.memory_bytes.checked_add(other.memory_bytes)?,
            gpus: self.gpus.checked_add(other.gpus)?,
        })
    }

    /// The difference, or `None` if any kind would go below zero.
    pub fn checked_sub(self, other: Resources) -> Option<Resources> {
        Some(Resources {
            cpu_millis: self.cpu_millis.checked_sub(other.cpu_millis)?,
            memory_bytes: self.memory_bytes.checked_sub(other.memory_bytes)?,
            gpus: self.gpus.checked_sub(other.gpus)?,
        })
    }

    /// The sum, each kind capped at its maximum.
    pub fn saturating_add(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            gpus: self.gpus.saturating_add(other.gpus),
        }
    }

    /// The difference, each kind floored at zero (what is free on an over-committed node is nothing).
    pub fn saturating_sub(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
            gpus: self.gpus.saturating_sub(other.gpus),
        }
    }

    /// Whether every kind is at most what `available` has.
    pub fn fits_in(self, available: Resources) -> bool {
        self.cpu_millis <= available.cpu_millis
            && self.memory_bytes <= available.memory_bytes
            && self.gpus <= available.gpus
    }

    /// The kinds of which there is more here than in `available`, in naming order.
    pub fn exceeding(self, available: Resources) -> impl Iterator<Item = ResourceKind> {
        ResourceKind::ALL
            .into_iter()
            .filter(move |&kind| self.get(kind) > available.get(kind))
    }

    /// Whether every kind is zero.
    pub fn is_zero(self) -> bool {
        self == Resources::ZERO
    }
}

impl fmt::Display for Resources {
    /// `cpu 1500m, memory 512 MiB, gpus 1` (GPUs only when there are any).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cpu {}, memory {}",
            ResourceKind::Cpu.format_amount(self.cpu_millis),
            format_bytes(self.memory_bytes)
        )?;
        if self.gpus > 0 {
            write!(f, ", gpus {}", self.gpus)?;
        }
        Ok(())
    }
}

/// `2 GiB`, `512 MiB`, `1000 bytes`: the largest binary unit that divides the amount exactly.
fn format_bytes(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (size, unit) in UNITS {
        if bytes >= size && bytes % size == 0 {
            return format!("{} {unit}", bytes / size);
        }
    }
    format!("{bytes} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn test_checked_add_and_sub_refuse_overflow_and_underflow() {
        let a = Resources::new(1000, GIB, 1);
        let b = Resources::new(500, GIB, 0);
        assert_eq!(a.checked_add(b), Some(Resources::new(1500, 2 * GIB, 1)));
        assert_eq!(a.checked_sub(b), Some(Resources::new(500, 0, 1)));
        assert_eq!(b.checked_sub(a), None, "gpus would go below zero");
        assert_eq!(
            Resources::new(u64::MAX, 0, 0).checked_add(Resources::new(1, 0, 0)),
            None
        );
        assert_eq!(
            Resources::new(0, 0, u32::MAX).checked_add(Resources::new(0, 0, 1)),
            None
        );
        assert_eq!(b.saturating_sub(a), Resources::new(0, 0, 0));
    }

    #[test]
    fn test_fits_in_needs_every_kind() {
        let free = Resources::new(2000, 4 * GIB, 0);
        assert!(Resources::new(2000, 4 * GIB, 0).fits_in(free));
        assert!(!Resources::new(2001, GIB, 0).fits_in(free));
        assert!(!Resources::new(1000, GIB, 1).fits_in(free));
        let lacking: Vec<_> = Resources::new(3000, 8 * GIB, 0).exceeding(free).collect();
        assert_eq!(lacking, [ResourceKind::Cpu, ResourceKind::Memory]);
    }

    #[test]
    fn test_display_uses_units() {
        assert_eq!(
            Resources::new(1500, 512 << 20, 0).to_string(),
            "cpu 1500m, memory 512 MiB"
        );
        assert_eq!(
            Resources::new(8000, 32 * GIB, 1).to_string(),
            "cpu 8000m, memory 32 GiB, gpus 1"
        );
        assert_eq!(ResourceKind::Memory.format_amount(1000), "1000 bytes");
    }
}
