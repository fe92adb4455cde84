//! Blob store throughput: put (hash, outboard, write, fsync, rename) of a 1 GiB stream from memory, a
//! verified full read, and verified range reads with proofs.
//!
//! `cargo run --release -p tartarus-effects --example blob_bench [DIR...]`: each DIR (default: `/dev/shm`,
//! which is tmpfs, and the system temporary directory, usually a disk) gets a fresh store.

use std::error::Error;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tartarus_effects::{verify_range, BlobStore, Cid, Quota};

const GIB: usize = 1 << 30;
const RANGE_LEN: u64 = 64 * 1024;
const RANGES: usize = 10_000;
const PUT_RUNS: usize = 3;

fn rate(bytes: usize, elapsed: Duration) -> String {
    format!("{:.2} GB/s", bytes as f64 / elapsed.as_secs_f64() / 1e9)
}

/// xorshift64*, enough to spread range offsets.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut dirs: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if dirs.is_empty() {
        dirs = vec![PathBuf::from("/dev/shm"), std::env::temp_dir()];
    }
    let mut data = vec![0; GIB];
    blake3::Hasher::new()
        .update(b"blob bench")
        .finalize_xof()
        .fill(&mut data);

    let start = Instant::now();
    let expected = Cid::of_bytes(&data);
    println!(
        "baseline blake3::hash (one thread, no I/O)   1 GiB in {:>7.3} s  {}",
        start.elapsed().as_secs_f64(),
        rate(GIB, start.elapsed())
    );

    for dir in dirs {
        let root = tempfile::tempdir_in(&dir)?;
        let store = BlobStore::open(root.path(), Quota::UNLIMITED)?;
        println!("store in {}", dir.display());

        // Three puts of the same stream, each into an empty store (release + gc in between), since page cache
        // allocation and writeback make single runs noisy.
        let mut times = Vec::new();
        let mut put = None;
        for _ in 0..PUT_RUNS {
            if let Some(previous) = put {
                store.release("bench", &previous)?;
                store.gc()?;
            }
            let start = Instant::now();
            let result = store.put("bench", data.as_slice())?;
            times.push(start.elapsed());
            assert!(result.stored);
            assert_eq!(result.cid, expected);
            put = Some(result.cid);
        }
        let cid = put.ok_or("no put ran")?;
        times.sort();
        println!(
            "  put (hash+outboard+write+fsync+rename)   1 GiB, {PUT_RUNS} runs: best {:.3} s {}, median {:.3} s {}",
            times[0].as_secs_f64(),
            rate(GIB, times[0]),
            times[PUT_RUNS / 2].as_secs_f64(),
            rate(GIB, times[PUT_RUNS / 2])
        );

        let start = Instant::now();
        let size = store.get(&cid, io::sink())?;
        let elapsed = start.elapsed();
        println!(
            "  verified full get to a sink              1 GiB in {:>7.3} s  {}",
            elapsed.as_secs_f64(),
            rate(size as usize, elapsed)
        );

        let mut state = 0x9e37_79b9_7f4a_7c15;
        let offsets: Vec<u64> = (0..RANGES)
            .map(|_| next(&mut state) % (size - RANGE_LEN))
            .collect();
        let (mut served, mut verified) = (Duration::ZERO, Duration::ZERO);
        let mut proof_bytes = 0;
        for offset in &offsets {
            let start = Instant::now();
            let read = store.get_range(&cid, *offset, RANGE_LEN)?;
            let middle = Instant::now();
            let bytes = verify_range(&cid, *offset, RANGE_LEN, &read.proof)?;
            verified += middle.elapsed();
            served += middle - start;
            assert_eq!(bytes, read.data);
            proof_bytes += read.proof.len();
        }
        let total = served + verified;
        let bytes = RANGES * RANGE_LEN as usize;
        println!(
            "  {RANGES} random 64 KiB ranges: get_range {:.0} ranges/s, verify_range {:.0} ranges/s, \
             both {:.0} ranges/s = {:.0} MB/s (proof {:.1} KiB per range)",
            RANGES as f64 / served.as_secs_f64(),
            RANGES as f64 / verified.as_secs_f64(),
            RANGES as f64 / total.as_secs_f64(),
            bytes as f64 / total.as_secs_f64() / 1e6,
            proof_bytes as f64 / RANGES as f64 / 1024.0
        );
    }
    Ok(())
}
