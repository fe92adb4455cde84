//! The blob store against its contract: round trips, verified reads, range proofs, tampering, dedup, quotas,
//! references, gc and concurrent puts.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use tartarus_effects::blobs::{GROUP_BYTES, PROOF_HEADER_BYTES};
use tartarus_effects::{verify_range, BlobStore, Cid, Quota};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

fn pseudo_random(len: usize, seed: u8) -> Vec<u8> {
    let mut data = vec![0; len];
    blake3::Hasher::new()
        .update(&[seed])
        .finalize_xof()
        .fill(&mut data);
    data
}

fn store(dir: &Path) -> BlobStore {
    BlobStore::open(dir, Quota::UNLIMITED).unwrap()
}

fn read_all(store: &BlobStore, cid: &Cid) -> Vec<u8> {
    let mut out = Vec::new();
    let size = store.get(cid, &mut out).unwrap();
    assert_eq!(size, out.len() as u64);
    out
}

fn data_path(dir: &Path, cid: &Cid) -> PathBuf {
    let hex = hex::encode(cid.digest());
    dir.join("blobs").join(&hex[..2]).join(hex)
}

fn flip_byte(path: &Path, offset: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset] ^= 0x01;
    fs::write(path, bytes).unwrap();
}

/// A reader that hands out its bytes in small, uneven pieces, as a socket would.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.step = self.step % 7919 + 1;
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn test_round_trip_every_size_matches_cid_of_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let sizes = [
        0,
        1,
        1023,
        1024,
        1025,
        16 * KIB - 1,
        16 * KIB,
        16 * KIB + 1,
        MIB - 1,
        MIB,
        MIB + 7,
        MIB + 16 * KIB + 1,
        8 * MIB,
    ];
    for (i, size) in sizes.into_iter().enumerate() {
        let data = pseudo_random(size, i as u8);
        let put = store.put("t", data.as_slice()).unwrap();
        assert_eq!(put.cid, Cid::of_bytes(&data), "size {size}");
        assert_eq!(put.size, size as u64);
        assert!(put.stored);
        assert_eq!(read_all(&store, &put.cid), data, "size {size}");
    }
}

#[test]
fn test_put_from_an_uneven_reader_gives_the_same_cid() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let data = pseudo_random(3 * MIB + 5, 9);
    let put = store.put("t", Trickle { data: &data, step: 0 }).unwrap();
    assert_eq!(put.cid, Cid::of_bytes(&data));
    assert_eq!(read_all(&store, &put.cid), data);
}

#[test]
fn test_range_proofs_verify_with_the_cid_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    for size in [0, 1, 1025, 16 * KIB + 1, MIB + 7] {
        let data = pseudo_random(size, 3);
        let cid = store.put("t", data.as_slice()).unwrap().cid;
        let mut ranges = vec![(0, size), (0, 0), (size, 0)];
        if size > 2 {
            ranges.extend([(1, size - 2), (size / 2, 1), (size - 1, 1)]);
        }
        if size > 100 * KIB {
            ranges.extend([(17 * KIB + 3, 64 * KIB), (0, 16 * KIB), (16 * KIB, 16 * KIB)]);
        }
        for (offset, len) in ranges {
            let read = store.get_range(&cid, offset as u64, len as u64).unwrap();
            assert_eq!(read.data, &data[offset..offset + len], "{size} {offset}+{len}");
            let verified = verify_range(&cid, offset as u64, len as u64, &read.proof).unwrap();
            assert_eq!(verified, read.data, "{size} {offset}+{len}");
        }
    }
}

#[test]
fn test_verify_range_fails_when_any_proof_byte_is_altered() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let data = pseudo_random(200 * KIB + 7, 4);
    let cid = store.put("t", data.as_slice()).unwrap().cid;
    let (offset, len) = (40 * KIB as u64 + 5, 3000);
    let proof = store.get_range(&cid, offset, len).unwrap().proof;
    assert!(proof.len() > PROOF_HEADER_BYTES + 3000);
    for i in 0..proof.len() {
        for bit in [0x01, 0x80] {
            let mut bad = proof.clone();
            bad[i] ^= bit;
            let err = verify_range(&cid, offset, len, &bad).unwrap_err();
            assert!(
                matches!(err.kind(), "invalid_proof" | "range_out_of_bounds"),
                "byte {i}: {err}"
            );
        }
    }
    let mut longer = proof.clone();
    longer.push(0);
    assert!(verify_range(&cid, offset, len, &longer)
        .unwrap_err()
        .to_string()
        .contains("1 bytes after its end"));
    for cut in [0, 10, PROOF_HEADER_BYTES, proof.len() / 2, proof.len() - 1] {
        assert_eq!(
            verify_range(&cid, offset, len, &proof[..cut]).unwrap_err().kind(),
            "invalid_proof",
            "cut at {cut}"
        );
    }
}

#[test]
fn test_verify_range_fails_for_another_range_or_cid() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let data = pseudo_random(100 * KIB, 5);
    let cid = store.put("t", data.as_slice()).unwrap().cid;
    let proof = store.get_range(&cid, 20_000, 5_000).unwrap().proof;
    for (offset, len) in [
        (20_001, 5_000),
        (20_000, 4_999),
        (20_000, 5_001),
        (0, 5_000),
        (90_000, 5_000),
    ] {
        let err = verify_range(&cid, offset, len, &proof).unwrap_err();
        assert!(err.to_string().contains("not"), "{offset}+{len}: {err}");
    }
    let other = Cid::of_bytes(b"another blob");
    assert_eq!(
        verify_range(&other, 20_000, 5_000, &proof).unwrap_err().kind(),
        "invalid_proof"
    );
    let object = Cid::of_object(&1u8).unwrap();
    assert_eq!(
        verify_range(&object, 20_000, 5_000, &proof).unwrap_err().kind(),
        "not_a_blob"
    );
}

#[test]
fn test_range_out_of_bounds_and_unknown_cid_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let cid = store.put("t", &[7u8; 1000][..]).unwrap().cid;
    for (offset, len) in [(0, 1001), (1000, 1), (1001, 0), (u64::MAX, 2)] {
        let err = store.get_range(&cid, offset, len).unwrap_err();
        assert_eq!(err.kind(), "range_out_of_bounds", "{offset}+{len}");
        assert!(err.to_string().contains("outside the blob (1000 bytes)"), "{err}");
    }
    let unknown = Cid::of_bytes(b"never stored");
    let err = store.get(&unknown, io::sink()).unwrap_err();
    assert_eq!(err.to_string(), format!("blob {unknown} not found"));
    assert_eq!(store.get_range(&unknown, 0, 1).unwrap_err().kind(), "not_found");
    assert!(!store.contains(&unknown));
    assert!(store.contains(&cid));
}

#[test]
fn test_tampered_blob_fails_full_and_range_reads_naming_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let data = pseudo_random(MIB + 7, 6);
    let cid = store.put("t", data.as_slice()).unwrap().cid;
    let offset = 5 * GROUP_BYTES + 100;
    flip_byte(&data_path(dir.path(), &cid), offset);

    let mut out = Vec::new();
    let err = store.get(&cid, &mut out).unwrap_err();
    let group = (5 * GROUP_BYTES) as u64;
    assert_eq!(
        err.to_string(),
        format!(
            "blob {cid} is corrupt in bytes {group}..{}",
            group + GROUP_BYTES as u64
        )
    );
    // Only the verified prefix before the damaged group was written out.
    assert_eq!(out, &data[..5 * GROUP_BYTES]);

    let err = store.get_range(&cid, offset as u64 - 50, 100).unwrap_err();
    assert_eq!(err.kind(), "corrupt_blob");
    // Ranges that do not touch the damaged group are still served and verify.
    let read = store.get_range(&cid, 0, 1000).unwrap();
    assert_eq!(verify_range(&cid, 0, 1000, &read.proof).unwrap(), &data[..1000]);
}

#[test]
fn test_tampered_small_and_truncated_blobs_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let small = store.put("t", &b"hello"[..]).unwrap().cid;
    flip_byte(&data_path(dir.path(), &small), 4);
    assert_eq!(store.get(&small, io::sink()).unwrap_err().kind(), "corrupt_blob");

    let data = pseudo_random(100 * KIB, 7);
    let cid = store.put("t", data.as_slice()).unwrap().cid;
    let path = data_path(dir.path(), &cid);
    fs::write(&path, &data[..50 * KIB]).unwrap();
    let err = store.get(&cid, io::sink()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("blob {cid} is corrupt in bytes {}..{}", 50 * KIB, 100 * KIB)
    );
}

#[test]
fn test_tampered_outboard_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let data = pseudo_random(MIB, 8);
    let cid = store.put("t", data.as_slice()).unwrap().cid;
    let outboard = data_path(dir.path(), &cid).with_extension("obao");
    let len = fs::metadata(&outboard).unwrap().len() as usize;
    assert_eq!(len, (MIB / GROUP_BYTES - 1) * 64 + 8);

    flip_byte(&outboard, 64 * 10 + 3);
    let err = store.get(&cid, io::sink()).unwrap_err();
    assert_eq!(err.kind(), "corrupt_outboard", "{err}");
    assert!(err
        .to_string()
        .starts_with(&format!("outboard of blob {cid} is corrupt: hash pair")));
    assert_eq!(
        store.get_range(&cid, 0, MIB as u64).unwrap_err().kind(),
        "corrupt_outboard"
    );
    flip_byte(&outboard, 64 * 10 + 3);
    assert_eq!(read_all(&store, &cid), data);

    flip_byte(&outboard, len - 8);
    let err = store.get(&cid, io::sink()).unwrap_err();
    assert_eq!(err.kind(), "corrupt_outboard");
    fs::remove_file(&outboard).unwrap();
    assert_eq!(
        store.get(&cid, io::sink()).unwrap_err().kind(),
        "corrupt_outboard"
    );
}

#[test]
fn test_dedup_reports_not_stored_and_repairs_a_damaged_copy() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let data = pseudo_random(300 * KIB, 10);
    let first = store.put("a", data.as_slice()).unwrap();
    let again = store.put("a", data.as_slice()).unwrap();
    let other_tenant = store.put("b", data.as_slice()).unwrap();
    assert!(first.stored);
    assert!(!again.stored);
    assert!(!other_tenant.stored);
    // The per-tenant answer: new to the tenant, whatever the others hold.
    assert!(first.added);
    assert!(!again.added);
    assert!(
        other_tenant.added,
        "b did not hold it: its answer must not depend on a"
    );
    assert_eq!(first.cid, again.cid);
    assert_eq!(store.usage("a").unwrap(), data.len() as u64);
    assert_eq!(store.usage("b").unwrap(), data.len() as u64);
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

    // A data file of the wrong length is replaced by the next put of the same content.
    fs::write(data_path(dir.path(), &first.cid), b"short").unwrap();
    assert!(store.put("a", data.as_slice()).unwrap().stored);
    assert_eq!(read_all(&store, &first.cid), data);
}

#[test]
fn test_quota_refuses_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), Quota::bytes_per_tenant(100 * KIB as u64)).unwrap();
    let a = pseudo_random(60 * KIB, 11);
    let b = pseudo_random(60 * KIB, 12);
    store.put("t", a.as_slice()).unwrap();

    let err = store.put("t", b.as_slice()).unwrap_err();
    assert_eq!(err.kind(), "quota_exceeded");
    assert_eq!(
        err.to_string(),
        "tenant t would use 122880 bytes, over its quota of 102400 (nothing stored)"
    );
    assert!(!store.contains(&Cid::of_bytes(&b)));
    // Putting content the tenant already references costs nothing.
    assert!(!store.put("t", a.as_slice()).unwrap().stored);
    // Another tenant has its own quota.
    store.put("u", b.as_slice()).unwrap();

    // A stream longer than the whole quota is cut short without being read to the end.
    let huge = io::repeat(1).take(10 * MIB as u64);
    let err = store.put("v", huge).unwrap_err();
    assert_eq!(err.kind(), "quota_exceeded");
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

    assert!(store.release("t", &Cid::of_bytes(&a)).unwrap());
    store.put("t", b.as_slice()).unwrap();
    assert_eq!(store.usage("t").unwrap(), 60 * KIB as u64);
}

#[test]
fn test_references_persist_across_reopen_and_gc_frees_unreferenced_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let shared = pseudo_random(200 * KIB, 13);
    let only_a = pseudo_random(MIB, 14);
    let (shared_cid, only_a_cid) = {
        let store = store(dir.path());
        let shared_cid = store.put("a", shared.as_slice()).unwrap().cid;
        store.put("b", shared.as_slice()).unwrap();
        let only_a_cid = store.put("a", only_a.as_slice()).unwrap().cid;
        (shared_cid, only_a_cid)
    };
    let store = store(dir.path());
    assert_eq!(store.usage("a").unwrap(), (200 * KIB + MIB) as u64);
    assert_eq!(store.gc().unwrap().blobs_removed, 0);

    assert!(store.release("a", &shared_cid).unwrap());
    assert!(!store.release("a", &shared_cid).unwrap());
    assert!(store.release("a", &only_a_cid).unwrap());
    assert_eq!(store.usage("a").unwrap(), 0);
    let report = store.gc().unwrap();
    assert_eq!(report.blobs_removed, 1);
    assert_eq!(
        report.bytes_freed,
        (MIB + (MIB / GROUP_BYTES - 1) * 64 + 8) as u64
    );
    assert!(!store.contains(&only_a_cid));
    assert!(store.contains(&shared_cid));
    assert_eq!(read_all(&store, &shared_cid), shared);

    assert!(store.release("b", &shared_cid).unwrap());
    assert_eq!(store.gc().unwrap().blobs_removed, 1);
    assert!(!store.contains(&shared_cid));
    assert_eq!(store.gc().unwrap(), Default::default());
}

#[test]
fn test_gc_removes_orphan_outboards_and_open_clears_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let cid = store.put("a", &[1u8; 40_000][..]).unwrap().cid;
    // As if a crash had come between the outboard's rename and the data's.
    fs::remove_file(data_path(dir.path(), &cid)).unwrap();
    fs::write(dir.path().join("tmp/data-crashed"), b"partial").unwrap();
    store.release("a", &cid).unwrap();
    let report = store.gc().unwrap();
    assert_eq!(report.blobs_removed, 0);
    assert_eq!(
        report.bytes_freed,
        2 * 64 + 8,
        "three groups, two hash pairs, the size"
    );
    drop(store);
    let _store = BlobStore::open(dir.path(), Quota::UNLIMITED).unwrap();
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
}

#[test]
fn test_invalid_tenants_and_object_ids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let err = store.put("../etc", &b"x"[..]).unwrap_err();
    assert_eq!(err.to_string(), "invalid tenant name \"../etc\"");
    let object = Cid::of_object(&"x").unwrap();
    assert_eq!(store.get(&object, io::sink()).unwrap_err().kind(), "not_a_blob");
}

#[test]
fn test_concurrent_puts_of_the_same_blob_store_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let data = pseudo_random(4 * MIB, 15);
    let stored = AtomicUsize::new(0);
    let cids: Vec<Cid> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let put = store.put("t", data.as_slice()).unwrap();
                    if put.stored {
                        stored.fetch_add(1, Ordering::SeqCst);
                    }
                    put.cid
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(cids.iter().all(|cid| *cid == Cid::of_bytes(&data)));
    assert_eq!(stored.load(Ordering::SeqCst), 1);
    let files: Vec<_> = fs::read_dir(dir.path().join("blobs"))
        .unwrap()
        .flat_map(|shard| fs::read_dir(shard.unwrap().path()).unwrap())
        .collect();
    assert_eq!(files.len(), 2, "one data file and its outboard");
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    assert_eq!(store.usage("t").unwrap(), 4 * MIB as u64);
    assert_eq!(read_all(&store, &cids[0]), data);
}
