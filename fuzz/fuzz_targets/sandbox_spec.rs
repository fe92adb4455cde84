//! Sandbox specs as stored and shipped (`tartarus-runtime/src/spec.rs`): `spec.json` beside a shim, the
//! records of the store, the body of a placement on a node.
//!
//! Properties: the strict reading (to execute) and the lenient one (to account) agree — strict accepts
//! exactly what lenient reads without unknown fields, and names the same unknown fields otherwise; a spec
//! that reads writes back to JSON the strict reading returns unchanged, so a stored spec executes as it
//! was validated; `validate` answers the same for both; a valid spec's applied limits are within the
//! runtime's bounds.

#![no_main]

use std::path::Component;

use libfuzzer_sys::fuzz_target;
use tartarus_runtime::spec::{
    normalize_sandbox_path, Applied, SpecDecodeError, MAX_CPUS, MAX_MEMORY_BYTES, MAX_PIDS, MIN_MEMORY_BYTES,
    MIN_PIDS,
};
use tartarus_runtime::SandboxSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = std::str::from_utf8(data) else {
        return;
    };
    let strict = SandboxSpec::from_json_strict(json);
    let stored = SandboxSpec::from_stored_json(json);
    let spec = match (&strict, stored) {
        (Ok(strict), Ok((lenient, unknown))) => {
            assert!(unknown.is_empty(), "strict accepted unknown fields {unknown:?}");
            assert_eq!(*strict, lenient, "the two readings disagree");
            lenient
        }
        (Err(SpecDecodeError::UnknownFields(named)), Ok((lenient, unknown))) => {
            assert!(!unknown.is_empty());
            assert_eq!(*named, unknown, "the two readings name different unknown fields");
            lenient
        }
        (Err(SpecDecodeError::Json(_)), Err(SpecDecodeError::Json(_))) => return,
        (strict, stored) => panic!("the readings disagree: strict {strict:?}, stored {stored:?}"),
    };

    let written = serde_json::to_string(&spec).expect("a spec read from JSON writes back to JSON");
    let again = SandboxSpec::from_json_strict(&written)
        .unwrap_or_else(|e| panic!("a written spec does not read back strictly: {e}: {written}"));
    assert_eq!(again, spec, "{written}");
    let valid = spec.validate();
    assert_eq!(again.validate(), valid);
    if valid.is_err() {
        return;
    }

    let applied = spec.applied_limits();
    if let Some(cpus) = applied.cpu_quota {
        assert!(cpus > 0.0 && cpus <= MAX_CPUS, "cpus {cpus}");
    }
    if let Applied::Requested(memory) = applied.memory_bytes {
        assert!((MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&memory));
    }
    if let Applied::Requested(pids) = applied.pids {
        assert!((MIN_PIDS..=MAX_PIDS).contains(&pids));
    }
    for path in spec.workdir.iter().chain(&spec.writable_paths) {
        let normal = normalize_sandbox_path(path);
        assert!(normal.is_absolute());
        assert!(
            normal
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_))),
            "{normal:?}"
        );
    }
});
