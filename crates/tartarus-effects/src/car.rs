//! CARv1, the IPLD content archive (<https://ipld.io/specs/transport/car/carv1/>), restricted to
//! effects-v1 blocks (effects-v1 §11.1): the one-file export of a set of objects and blobs, each checked
//! against its id when read.
//!
//! Layout: a header (an unsigned LEB128 varint length, then canonical DAG-CBOR `{"roots": [links],
//! "version": 1}`), then sections (a varint of the CID's and the data's length together, the 36-byte
//! binary CID, the data). A CAR carries no signature of its own: what makes it trustworthy is that every
//! block is verified against its CID here, and that the objects it roots are signed (see
//! [`crate::episode`]).
//!
//! The reader is written for hostile input: varints are at most [`MAX_VARINT_BYTES`] and minimal, the
//! header at most [`MAX_HEADER_BYTES`], a section at most [`MAX_SECTION_BYTES`], and a section's buffer grows
//! with the bytes actually read, so a length that lies costs nothing.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, BufRead, BufReader, Read, Write};

use ipld_core::ipld::Ipld;
use serde::{Deserialize, Serialize};

use crate::cid::{Cid, Codec};
use crate::{canonical, EffectsError};

/// The only CAR version read and written.
pub const CAR_VERSION: u64 = 1;
/// Longest varint accepted: 9 bytes (63 bits), as in the multiformats unsigned-varint spec.
pub const MAX_VARINT_BYTES: usize = 9;
/// Largest header accepted (1 MiB, some twenty thousand roots).
pub const MAX_HEADER_BYTES: u64 = 1 << 20;
/// Largest section (CID and data) accepted or written: 1 GiB.
pub const MAX_SECTION_BYTES: u64 = 1 << 30;
/// Length of every effects-v1 CID in binary form.
const CID_BYTES: usize = 36;

/// The CAR header.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    roots: Vec<Cid>,
    version: u64,
}

/// A whole CAR file in memory, every block verified against its CID ([`read_car`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Car {
    /// The header's roots, in order (at least one).
    pub roots: Vec<Cid>,
    /// Every block by CID.
    pub blocks: BTreeMap<Cid, Vec<u8>>,
}

/// Writes a CARv1 file: the header at [`CarWriter::new`], one section per distinct block.
///
/// Every block is checked before it is written: its bytes hash to its CID and, for a dag-cbor CID, are
/// canonical. So a file written here is always one [`read_car`] accepts.
#[derive(Debug)]
pub struct CarWriter<W: Write> {
    out: W,
    offset: u64,
    written: HashSet<Cid>,
}

impl<W: Write> CarWriter<W> {
    /// Writes the header naming `roots` (at least one) to `out`.
    pub fn new(mut out: W, roots: &[Cid]) -> Result<Self, EffectsError> {
        if roots.is_empty() {
            return Err(invalid(0, "a CAR names at least one root"));
        }
        let header = canonical::encode(&Header {
            roots: roots.to_vec(),
            version: CAR_VERSION,
        })?;
        let len = header.len() as u64;
        if len > MAX_HEADER_BYTES {
            return Err(invalid(
                0,
                format!(
                    "header of {len} bytes exceeds {MAX_HEADER_BYTES} ({} roots)",
                    roots.len()
                ),
            ));
        }
        let mut prefix = Vec::with_capacity(MAX_VARINT_BYTES);
        put_varint(&mut prefix, len);
        write(&mut out, &prefix)?;
        write(&mut out, &header)?;
        Ok(Self {
            out,
            offset: prefix.len() as u64 + len,
            written: HashSet::new(),
        })
    }

    /// Appends the block `data` with id `cid`; a block already written is skipped (same id, same bytes).
    ///
    /// Refuses bytes that do not hash to `cid` ([`EffectsError::HashMismatch`]), non-canonical bytes under a
    /// dag-cbor id, and a section larger than [`MAX_SECTION_BYTES`].
    pub fn block(&mut self, cid: &Cid, data: &[u8]) -> Result<(), EffectsError> {
        if self.written.contains(cid) {
            return Ok(());
        }
        check_block(cid, data).map_err(|e| match e {
            EffectsError::HashMismatch { .. } => e,
            other => invalid(
                self.offset,
                format!("block {cid} is not canonical DAG-CBOR: {other}"),
            ),
        })?;
        let len = (CID_BYTES + data.len()) as u64;
        if len > MAX_SECTION_BYTES {
            return Err(invalid(
                self.offset,
                format!("block {cid} of {} bytes exceeds the section limit", data.len()),
            ));
        }
        let mut prefix = Vec::with_capacity(MAX_VARINT_BYTES + CID_BYTES);
        put_varint(&mut prefix, len);
        prefix.extend_from_slice(&cid.to_bytes());
        write(&mut self.out, &prefix)?;
        write(&mut self.out, data)?;
        self.offset += (prefix.len() + data.len()) as u64;
        self.written.insert(*cid);
        Ok(())
    }

    /// Flushes and returns the output.
    pub fn finish(mut self) -> Result<W, EffectsError> {
        self.out.flush().map_err(|source| EffectsError::Io {
            what: "writing the CAR",
            source,
        })?;
        Ok(self.out)
    }
}

/// Reads a CARv1 file one block at a time, verifying each block against its CID.
///
/// The input is buffered here; pass the file or socket as it is.
#[derive(Debug)]
pub struct CarReader<R: Read> {
    input: BufReader<R>,
    offset: u64,
    roots: Vec<Cid>,
    seen: HashSet<Cid>,
    failed: bool,
}

impl<R: Read> CarReader<R> {
    /// Reads and checks the header: a canonical DAG-CBOR map of `roots` (effects-v1 CIDs, at least one) and
    /// `version` 1, nothing else.
    pub fn new(input: R) -> Result<Self, EffectsError> {
        let mut reader = Self {
            input: BufReader::new(input),
            offset: 0,
            roots: Vec::new(),
            seen: HashSet::new(),
            failed: false,
        };
        let len = match reader.read_varint("header length", MAX_HEADER_BYTES)? {
            Some(len) => len,
            None => return Err(invalid(0, "empty file: no CAR header")),
        };
        let at = reader.offset;
        let bytes = reader.read_exactly(len, "header")?;
        reader.roots = parse_header(&bytes).map_err(|reason| invalid(at, reason))?;
        Ok(reader)
    }

    /// The header's roots.
    pub fn roots(&self) -> &[Cid] {
        &self.roots
    }

    /// The next block, or `None` at the end of the file.
    ///
    /// Refuses a truncated section, a CID that is not an effects-v1 CID, a CID seen before in this file,
    /// bytes that do not hash to the CID ([`EffectsError::HashMismatch`], `what` = `block`) and, under a
    /// dag-cbor CID, bytes that are not canonical. After an error the reader is done: it returns `None`.
    pub fn next_block(&mut self) -> Result<Option<(Cid, Vec<u8>)>, EffectsError> {
        if self.failed {
            return Ok(None);
        }
        let block = self.read_block();
        self.failed = block.is_err();
        block
    }

    fn read_block(&mut self) -> Result<Option<(Cid, Vec<u8>)>, EffectsError> {
        let at = self.offset;
        let Some(len) = self.read_varint("section length", MAX_SECTION_BYTES)? else {
            return Ok(None);
        };
        if len < CID_BYTES as u64 {
            return Err(invalid(
                at,
                format!("section of {len} bytes is shorter than a CID"),
            ));
        }
        let id = self.read_exactly(CID_BYTES as u64, "block id")?;
        let cid = Cid::from_bytes(&id).map_err(|e| invalid(at, format!("block id: {e}")))?;
        let data = self.read_exactly(len - CID_BYTES as u64, "block data")?;
        if !self.seen.insert(cid) {
            return Err(invalid(at, format!("block {cid} appears twice")));
        }
        check_block(&cid, &data).map_err(|e| match e {
            EffectsError::HashMismatch { .. } => e,
            other => invalid(at, format!("block {cid} is not canonical DAG-CBOR: {other}")),
        })?;
        Ok(Some((cid, data)))
    }

    /// Reads an unsigned LEB128 varint of at most [`MAX_VARINT_BYTES`], minimal and at most `max`; `None` on
    /// a clean end of input before its first byte.
    fn read_varint(&mut self, what: &str, max: u64) -> Result<Option<u64>, EffectsError> {
        let at = self.offset;
        let mut value = 0u64;
        for index in 0..MAX_VARINT_BYTES {
            let Some(byte) = self.read_byte()? else {
                if index == 0 {
                    return Ok(None);
                }
                return Err(invalid(at, format!("file ends inside the {what}")));
            };
            value |= u64::from(byte & 0x7f) << (7 * index);
            if byte & 0x80 == 0 {
                if byte == 0 && index > 0 {
                    return Err(invalid(at, format!("{what} varint is not minimal")));
                }
                if value > max {
                    return Err(invalid(at, format!("{what} {value} exceeds the limit of {max}")));
                }
                return Ok(Some(value));
            }
        }
        Err(invalid(
            at,
            format!("{what} varint is longer than {MAX_VARINT_BYTES} bytes"),
        ))
    }

    fn read_byte(&mut self) -> Result<Option<u8>, EffectsError> {
        let byte = loop {
            match self.input.fill_buf() {
                Ok(buffer) => break buffer.first().copied(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(read_error(source)),
            }
        };
        if byte.is_some() {
            self.input.consume(1);
            self.offset += 1;
        }
        Ok(byte)
    }

    /// Reads exactly `len` bytes. The buffer grows with what arrives, so a lying length costs nothing.
    fn read_exactly(&mut self, len: u64, what: &str) -> Result<Vec<u8>, EffectsError> {
        let at = self.offset;
        let mut bytes = Vec::new();
        (&mut self.input)
            .take(len)
            .read_to_end(&mut bytes)
            .map_err(read_error)?;
        self.offset += bytes.len() as u64;
        if (bytes.len() as u64) < len {
            return Err(invalid(
                at,
                format!("file ends inside the {what}: {} of {len} bytes", bytes.len()),
            ));
        }
        Ok(bytes)
    }
}

impl<R: Read> Iterator for CarReader<R> {
    type Item = Result<(Cid, Vec<u8>), EffectsError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_block().transpose()
    }
}

/// Reads a whole CAR file into memory, verifying every block ([`CarReader`]).
pub fn read_car(input: impl Read) -> Result<Car, EffectsError> {
    let mut reader = CarReader::new(input)?;
    let mut blocks = BTreeMap::new();
    while let Some((cid, data)) = reader.next_block()? {
        blocks.insert(cid, data);
    }
    Ok(Car {
        roots: reader.roots,
        blocks,
    })
}

/// Checks the header bytes, reporting the version before the layout so that a CARv2 file says so.
fn parse_header(bytes: &[u8]) -> Result<Vec<Cid>, String> {
    let value: Ipld =
        canonical::decode(bytes).map_err(|e| format!("header is not canonical DAG-CBOR: {e}"))?;
    let Ipld::Map(fields) = &value else {
        return Err("header is not a map".into());
    };
    match fields.get("version") {
        Some(Ipld::Integer(version)) if *version == i128::from(CAR_VERSION) => {}
        Some(Ipld::Integer(version)) => {
            return Err(format!("CAR version {version} is not supported (only CARv1)"))
        }
        _ => return Err("header has no integer version".into()),
    }
    let header: Header = canonical::decode(bytes).map_err(|e| format!("header: {e}"))?;
    if header.roots.is_empty() {
        return Err("header names no roots".into());
    }
    Ok(header.roots)
}

/// Checks that `data` hashes to `cid` and, under a dag-cbor id, is canonical.
fn check_block(cid: &Cid, data: &[u8]) -> Result<(), EffectsError> {
    let actual = Cid::from_digest(cid.codec(), *blake3::hash(data).as_bytes());
    if actual != *cid {
        return Err(EffectsError::HashMismatch {
            what: "block",
            expected: cid.to_string(),
            actual: actual.to_string(),
        });
    }
    if cid.codec() == Codec::DagCbor {
        canonical::validate(data)?;
    }
    Ok(())
}

/// Appends `value` as an unsigned LEB128 varint.
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn write(out: &mut impl Write, bytes: &[u8]) -> Result<(), EffectsError> {
    out.write_all(bytes).map_err(|source| EffectsError::Io {
        what: "writing the CAR",
        source,
    })
}

fn read_error(source: io::Error) -> EffectsError {
    EffectsError::Io {
        what: "reading the CAR",
        source,
    }
}

fn invalid(offset: u64, reason: impl Into<String>) -> EffectsError {
    EffectsError::InvalidCar {
        offset,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(value: &str) -> (Cid, Vec<u8>) {
        let bytes = canonical::encode(&value).unwrap();
        (Cid::of_encoded(&bytes).unwrap(), bytes)
    }

    fn sample() -> (Vec<u8>, Cid, Cid) {
        let (root, root_bytes) = object("root");
        let blob = b"some blob".to_vec();
        let blob_cid = Cid::of_bytes(&blob);
        let mut writer = CarWriter::new(Vec::new(), &[root]).unwrap();
        writer.block(&root, &root_bytes).unwrap();
        writer.block(&blob_cid, &blob).unwrap();
        writer.block(&blob_cid, &blob).unwrap();
        (writer.finish().unwrap(), root, blob_cid)
    }

    /// The offsets of the header's end and of each section, by walking the varints of a good file.
    fn sections(car: &[u8]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < car.len() {
            let (mut len, mut shift, start) = (0usize, 0, at);
            loop {
                let byte = car[at];
                at += 1;
                len |= usize::from(byte & 0x7f) << shift;
                shift += 7;
                if byte & 0x80 == 0 {
                    break;
                }
            }
            out.push((start, at - start));
            at += len;
        }
        out
    }

    #[test]
    fn test_round_trip_skips_duplicates() {
        let (car, root, blob) = sample();
        let read = read_car(car.as_slice()).unwrap();
        assert_eq!(read.roots, vec![root]);
        assert_eq!(read.blocks.len(), 2);
        assert_eq!(read.blocks[&blob], b"some blob");
        // header + two sections, the duplicate left out
        assert_eq!(sections(&car).len(), 3);
    }

    #[test]
    fn test_varints_are_leb128() {
        for (value, expected) in [
            (0u64, "00"),
            (1, "01"),
            (127, "7f"),
            (128, "8001"),
            (300, "ac02"),
            (1 << 30, "80808080 04"),
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(hex::encode(out), expected.replace(' ', ""), "{value}");
        }
    }

    #[test]
    fn test_header_is_canonical_roots_then_version() {
        let (car, root, _) = sample();
        let header_len = usize::from(car[0]);
        let mut expected = vec![0xa2, 0x65];
        expected.extend_from_slice(b"roots");
        expected.push(0x81);
        expected.extend_from_slice(&canonical::encode(&root).unwrap());
        expected.push(0x67);
        expected.extend_from_slice(b"version");
        expected.push(0x01);
        assert_eq!(&car[1..1 + header_len], expected.as_slice());
    }

    #[test]
    fn test_writer_refuses_mismatched_and_non_canonical_blocks() {
        let (root, _) = object("root");
        let mut writer = CarWriter::new(Vec::new(), &[root]).unwrap();
        let err = writer.block(&Cid::of_bytes(b"a"), b"b").unwrap_err();
        assert_eq!(err.kind(), "hash_mismatch");
        let unsorted = hex::decode("a2616201616102").unwrap();
        let cid = Cid::from_digest(Codec::DagCbor, *blake3::hash(&unsorted).as_bytes());
        assert_eq!(writer.block(&cid, &unsorted).unwrap_err().kind(), "invalid_car");
        assert_eq!(CarWriter::new(Vec::new(), &[]).unwrap_err().kind(), "invalid_car");
    }

    #[test]
    fn test_reader_refuses_a_tampered_block() {
        let (mut car, _, blob) = sample();
        let last = car.len() - 1;
        car[last] ^= 1;
        let err = read_car(car.as_slice()).unwrap_err();
        assert_eq!(err.kind(), "hash_mismatch");
        assert!(err.to_string().contains(&blob.to_string()), "{err}");
    }

    #[test]
    fn test_reader_refuses_every_truncation() {
        let (car, _, _) = sample();
        let boundaries: Vec<usize> = sections(&car).iter().skip(1).map(|(start, _)| *start).collect();
        for len in 0..car.len() {
            let result = read_car(&car[..len]);
            if boundaries.contains(&len) {
                // Cut exactly between sections: a shorter, still valid CAR.
                assert!(result.is_ok(), "at {len}");
            } else {
                let err = result.expect_err("truncated CAR accepted");
                assert_eq!(err.kind(), "invalid_car", "at {len}: {err}");
            }
        }
    }

    #[test]
    fn test_reader_refuses_a_repeated_block() {
        let (car, _, _) = sample();
        let parts = sections(&car);
        let (start, _) = parts[2];
        let mut doubled = car.clone();
        doubled.extend_from_slice(&car[start..]);
        let err = read_car(doubled.as_slice()).unwrap_err();
        assert_eq!(err.kind(), "invalid_car");
        assert!(err.to_string().contains("twice"), "{err}");
    }

    fn with_header(header: &[u8]) -> Vec<u8> {
        let mut car = Vec::new();
        put_varint(&mut car, header.len() as u64);
        car.extend_from_slice(header);
        car
    }

    #[test]
    fn test_reader_refuses_bad_headers() {
        let (root, _) = object("root");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                canonical::encode(&Header {
                    roots: vec![root],
                    version: 2,
                })
                .unwrap(),
                "version 2",
            ),
            (
                canonical::encode(&Header {
                    roots: vec![],
                    version: 1,
                })
                .unwrap(),
                "no roots",
            ),
            // {"version": 1, "roots": []}: keys out of order
            (
                hex::decode("a26776657273696f6e01 65726f6f747380".replace(' ', "")).unwrap(),
                "not canonical",
            ),
            (
                canonical::encode(&serde_json::json!({"roots": [], "version": 1, "x": 0})).unwrap(),
                "header",
            ),
            (canonical::encode(&"text").unwrap(), "not a map"),
            (
                canonical::encode(&serde_json::json!({"roots": []})).unwrap(),
                "no integer version",
            ),
        ];
        for (header, needle) in cases {
            let err = read_car(with_header(&header).as_slice()).unwrap_err();
            assert_eq!(err.kind(), "invalid_car", "{err}");
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
        assert!(read_car(&[][..]).unwrap_err().to_string().contains("empty file"));
    }

    #[test]
    fn test_reader_refuses_bad_varints_and_sizes() {
        let (car, _, _) = sample();
        let header_end = sections(&car)[1].0;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x80, 0x00], "not minimal"),
            (vec![0xff; 10], "longer than 9"),
            (vec![0x80, 0x80, 0x80, 0x80, 0x08], "exceeds the limit"),
            (vec![0x10], "shorter than a CID"),
            (vec![0x00], "shorter than a CID"),
        ];
        for (tail, needle) in cases {
            let mut bad = car[..header_end].to_vec();
            bad.extend_from_slice(&tail);
            let err = read_car(bad.as_slice()).unwrap_err();
            assert_eq!(err.kind(), "invalid_car", "{err}");
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
        // A header length over the limit is refused before anything is read.
        let err = read_car(&[0x80, 0x80, 0x80, 0x01][..]).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
    }

    #[test]
    fn test_reader_refuses_a_lying_section_length_without_allocating_it() {
        let (car, _, _) = sample();
        let header_end = sections(&car)[1].0;
        let mut bad = car[..header_end].to_vec();
        put_varint(&mut bad, MAX_SECTION_BYTES);
        bad.extend_from_slice(&Cid::of_bytes(b"data").to_bytes());
        bad.extend_from_slice(b"data");
        let err = read_car(bad.as_slice()).unwrap_err();
        assert!(
            err.to_string().contains("block data: 4 of 1073741788 bytes"),
            "{err}"
        );
    }

    #[test]
    fn test_reader_refuses_foreign_cids() {
        let (car, _, _) = sample();
        let header_end = sections(&car)[1].0;
        let mut bad = car[..header_end].to_vec();
        // a sha2-256 raw CID
        let mut section = vec![0x01, 0x55, 0x12, 0x20];
        section.extend_from_slice(&[0; 32]);
        section.extend_from_slice(b"data");
        put_varint(&mut bad, section.len() as u64);
        bad.extend_from_slice(&section);
        let err = read_car(bad.as_slice()).unwrap_err();
        assert_eq!(err.kind(), "invalid_car");
        assert!(err.to_string().contains("not blake3"), "{err}");
    }

    #[test]
    fn test_reader_stops_after_an_error() {
        let (mut car, _, _) = sample();
        let last = car.len() - 1;
        car[last] ^= 1;
        let mut reader = CarReader::new(car.as_slice()).unwrap();
        let results: Vec<bool> = reader.by_ref().map(|block| block.is_ok()).collect();
        assert_eq!(results, vec![true, false]);
        assert!(reader.next_block().unwrap().is_none());
    }

    #[test]
    fn test_reader_streams_blocks_in_file_order() {
        let (car, root, blob) = sample();
        let mut reader = CarReader::new(car.as_slice()).unwrap();
        assert_eq!(reader.roots(), &[root]);
        let ids: Vec<Cid> = reader.by_ref().map(|block| block.unwrap().0).collect();
        assert_eq!(ids, vec![root, blob]);
        assert!(reader.next_block().unwrap().is_none());
    }
}
