//! Resource classes: named sandbox sizes a request (or a template rule) picks instead of numbers.
//!
//! | class | CPUs | memory (MiB) | GPU | notes |
//! | --- | --- | --- | --- | --- |
//! | `ember` | 1 | 512 | no | the size of a request that names neither a class nor numbers |
//! | `flame` | 2 | 2048 | no | |
//! | `blaze` | 4 | 8192 | no | |
//! | `inferno` | 8 | 32768 | yes | |
//! | `quarantine` | 1 | 512 | no | no network, stricter seccomp ([`crate::QUARANTINE_DENIED_SYSCALLS`]) |

use serde::Serialize;

/// A named sandbox size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ResourceClass {
    /// `ember`, `flame`, `blaze`, `inferno` or `quarantine`.
    pub name: &'static str,
    /// CPU bandwidth in cores.
    pub cpus: f64,
    /// Memory limit in MiB.
    pub memory_mb: u64,
    /// Whether the sandbox gets a GPU (scheduling onto a GPU node is the server's).
    pub gpu: bool,
    /// Whether the sandbox is quarantined: no network, the stricter seccomp set.
    pub quarantined: bool,
}

/// The class quarantined requests get.
pub const QUARANTINE_CLASS: &str = "quarantine";

/// The class whose size a request gets when it names neither a class nor (some of) its numbers.
pub const DEFAULT_CLASS: &str = "ember";

/// Every class, smallest first (see the module docs).
pub const RESOURCE_CLASSES: &[ResourceClass] = &[
    class("ember", 1.0, 512, false, false),
    class("flame", 2.0, 2048, false, false),
    class("blaze", 4.0, 8192, false, false),
    class("inferno", 8.0, 32768, true, false),
    class(QUARANTINE_CLASS, 1.0, 512, false, true),
];

const fn class(name: &'static str, cpus: f64, memory_mb: u64, gpu: bool, quarantined: bool) -> ResourceClass {
    ResourceClass {
        name,
        cpus,
        memory_mb,
        gpu,
        quarantined,
    }
}

/// The class called `name` (exact, lower case), if there is one.
pub fn resource_class(name: &str) -> Option<ResourceClass> {
    RESOURCE_CLASSES.iter().find(|c| c.name == name).copied()
}

/// The class names, for error messages: `ember, flame, blaze, inferno, quarantine`.
pub(crate) fn class_names() -> String {
    RESOURCE_CLASSES
        .iter()
        .map(|c| c.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_resource_class_sizes() {
        let sizes: Vec<_> = ["ember", "flame", "blaze", "inferno", "quarantine"]
            .iter()
            .map(|n| {
                let c = resource_class(n).unwrap();
                (c.cpus, c.memory_mb, c.gpu, c.quarantined)
            })
            .collect();
        assert_eq!(
            sizes,
            [
                (1.0, 512, false, false),
                (2.0, 2048, false, false),
                (4.0, 8192, false, false),
                (8.0, 32768, true, false),
                (1.0, 512, false, true),
            ]
        );
    }

    #[test]
    fn test_resource_class_unknown_is_none() {
        assert_eq!(resource_class("Ember"), None);
        assert_eq!(resource_class("volcano"), None);
    }
}
