//! Content ids: CIDv1 with a BLAKE3-256 multihash, codec dag-cbor for objects and raw for blobs
//! (effects-v1 §3).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{canonical, EffectsError};

/// Multicodec code of DAG-CBOR, the codec of objects.
pub const DAG_CBOR: u64 = 0x71;
/// Multicodec code of raw bytes, the codec of blobs.
pub const RAW: u64 = 0x55;
/// Multicodec code of the BLAKE3 multihash.
pub const BLAKE3: u64 = 0x1e;
/// Length of every digest: BLAKE3's default 256-bit output.
pub const DIGEST_LEN: usize = 32;

/// What a [`Cid`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Codec {
    /// A canonical DAG-CBOR object (0x71).
    DagCbor,
    /// An opaque blob (0x55).
    Raw,
}

impl Codec {
    /// The multicodec code.
    pub fn code(self) -> u64 {
        match self {
            Self::DagCbor => DAG_CBOR,
            Self::Raw => RAW,
        }
    }
}

/// An effects-v1 content id: CIDv1, codec dag-cbor or raw, BLAKE3 with a 32-byte digest.
///
/// Only this shape can be built or parsed, so two equal values are the same content. Text is multibase
/// base32 lower (`b…`) and nothing else; inside DAG-CBOR objects a `Cid` is an IPLD link (tag 42).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cid(cid::Cid);

impl Cid {
    /// The id of an object: BLAKE3 of its canonical encoding ([`canonical::encode`]), codec dag-cbor.
    pub fn of_object<T: Serialize + ?Sized>(value: &T) -> Result<Self, EffectsError> {
        Ok(Self::new(Codec::DagCbor, &canonical::encode(value)?))
    }

    /// The id of a blob: BLAKE3 of the bytes, codec raw.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self::new(Codec::Raw, bytes)
    }

    /// The id of already-encoded object bytes, after checking they are canonical ([`canonical::validate`]).
    pub fn of_encoded(bytes: &[u8]) -> Result<Self, EffectsError> {
        canonical::validate(bytes)?;
        Ok(Self::new(Codec::DagCbor, bytes))
    }

    fn new(codec: Codec, content: &[u8]) -> Self {
        Self::from_digest(codec, *blake3::hash(content).as_bytes())
    }

    /// The id with this codec and BLAKE3 digest.
    pub fn from_digest(codec: Codec, digest: [u8; DIGEST_LEN]) -> Self {
        // A 32-byte digest always fits the 64-byte multihash.
        let hash = cid::multihash::Multihash::<64>::wrap(BLAKE3, &digest)
            .unwrap_or_else(|_| unreachable!("32-byte digest fits a 64-byte multihash"));
        Self(cid::Cid::new_v1(codec.code(), hash))
    }

    /// What the id names.
    pub fn codec(&self) -> Codec {
        if self.0.codec() == DAG_CBOR {
            Codec::DagCbor
        } else {
            Codec::Raw
        }
    }

    /// The BLAKE3 digest.
    pub fn digest(&self) -> [u8; DIGEST_LEN] {
        let mut digest = [0; DIGEST_LEN];
        digest.copy_from_slice(self.0.hash().digest());
        digest
    }

    /// The binary form: version varint, codec varint, multihash (36 bytes for every effects-v1 id).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_bytes()
    }

    /// Parses the binary form, refusing anything but an effects-v1 CID.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EffectsError> {
        let inner = cid::Cid::try_from(bytes).map_err(|e| EffectsError::InvalidCid(e.to_string()))?;
        let cid = Self::check(inner)?;
        if cid.to_bytes() != bytes {
            return Err(EffectsError::InvalidCid("not the canonical binary form".into()));
        }
        Ok(cid)
    }

    fn check(inner: cid::Cid) -> Result<Self, EffectsError> {
        if inner.version() != cid::Version::V1 {
            return Err(EffectsError::InvalidCid(
                "CIDv0 is not used; effects-v1 ids are CIDv1".into(),
            ));
        }
        if inner.codec() != DAG_CBOR && inner.codec() != RAW {
            return Err(EffectsError::InvalidCid(format!(
                "codec 0x{:x} is neither dag-cbor (0x71) nor raw (0x55)",
                inner.codec()
            )));
        }
        let hash = inner.hash();
        if hash.code() != BLAKE3 {
            return Err(EffectsError::InvalidCid(format!(
                "hash function 0x{:x} is not blake3 (0x1e)",
                hash.code()
            )));
        }
        if hash.size() as usize != DIGEST_LEN {
            return Err(EffectsError::InvalidCid(format!(
                "digest is {} bytes, not {DIGEST_LEN}",
                hash.size()
            )));
        }
        Ok(Self(inner))
    }
}

impl fmt::Display for Cid {
    /// Multibase base32 lower, no padding: `b` then 58 characters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self
            .0
            .to_string_of_base(cid::multibase::Base::Base32Lower)
            .map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

impl fmt::Debug for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cid({self})")
    }
}

impl FromStr for Cid {
    type Err = EffectsError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if !text.starts_with('b') {
            return Err(EffectsError::InvalidCid(
                "must be multibase base32 lower, starting with 'b'".into(),
            ));
        }
        let inner = cid::Cid::try_from(text).map_err(|e| EffectsError::InvalidCid(e.to_string()))?;
        let cid = Self::check(inner)?;
        // Base32 has several spellings of the same bytes (upper case, padding, stray low bits); one is canonical.
        if cid.to_string() != text {
            return Err(EffectsError::InvalidCid(
                "not the canonical base32 lower spelling".into(),
            ));
        }
        Ok(cid)
    }
}

impl Serialize for Cid {
    /// As an IPLD link: tag 42 in DAG-CBOR.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Cid {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let inner = cid::Cid::deserialize(deserializer)?;
        Self::check(inner).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_of_bytes_is_raw_blake3() {
        let cid = Cid::of_bytes(b"hello");
        assert_eq!(cid.codec(), Codec::Raw);
        assert_eq!(cid.digest(), *blake3::hash(b"hello").as_bytes());
        let bytes = cid.to_bytes();
        assert_eq!(&bytes[..4], &[0x01, 0x55, 0x1e, 0x20]);
        assert_eq!(bytes.len(), 36);
    }

    #[test]
    fn test_of_object_hashes_canonical_bytes() {
        let value = serde_json::json!({"b": 1, "a": 2});
        let cid = Cid::of_object(&value).unwrap();
        assert_eq!(cid.codec(), Codec::DagCbor);
        let encoded = canonical::encode(&value).unwrap();
        assert_eq!(cid.digest(), *blake3::hash(&encoded).as_bytes());
        assert_eq!(Cid::of_encoded(&encoded).unwrap(), cid);
        assert_eq!(&cid.to_bytes()[..4], &[0x01, 0x71, 0x1e, 0x20]);
    }

    #[test]
    fn test_of_encoded_rejects_non_canonical_bytes() {
        assert_eq!(
            Cid::of_encoded(&[0xa2, 0x61, 0x62, 0x01, 0x61, 0x61, 0x02])
                .unwrap_err()
                .kind(),
            "unsorted_keys"
        );
    }

    #[test]
    fn test_display_is_base32_lower_and_parses_back() {
        let cid = Cid::of_bytes(b"");
        let text = cid.to_string();
        assert!(text.starts_with("bafkr4i"), "{text}");
        assert_eq!(text.len(), 59);
        assert_eq!(text.parse::<Cid>().unwrap(), cid);
        assert_eq!(Cid::from_bytes(&cid.to_bytes()).unwrap(), cid);
    }

    #[test]
    fn test_parse_rejects_other_bases_and_spellings() {
        let text = Cid::of_bytes(b"x").to_string();
        let upper = format!("B{}", text[1..].to_uppercase());
        assert!(upper
            .parse::<Cid>()
            .unwrap_err()
            .to_string()
            .contains("base32 lower"));
        let base58 = Cid::of_bytes(b"x")
            .0
            .to_string_of_base(cid::multibase::Base::Base58Btc)
            .unwrap();
        assert_eq!(base58.parse::<Cid>().unwrap_err().kind(), "invalid_cid");
        assert_eq!("".parse::<Cid>().unwrap_err().kind(), "invalid_cid");
        assert_eq!("bnotacid".parse::<Cid>().unwrap_err().kind(), "invalid_cid");
        assert_eq!(text[..30].parse::<Cid>().unwrap_err().kind(), "invalid_cid");
    }

    #[test]
    fn test_parse_rejects_other_hashes_codecs_and_versions() {
        // sha2-256 over "x", codec raw
        let sha = cid::multihash::Multihash::<64>::wrap(0x12, &[7; 32]).unwrap();
        let text = cid::Cid::new_v1(RAW, sha).to_string();
        assert!(text
            .parse::<Cid>()
            .unwrap_err()
            .to_string()
            .contains("not blake3"));
        let blake = cid::multihash::Multihash::<64>::wrap(BLAKE3, &[7; 32]).unwrap();
        let json_codec = cid::Cid::new_v1(0x0129, blake).to_string();
        assert!(json_codec
            .parse::<Cid>()
            .unwrap_err()
            .to_string()
            .contains("codec 0x129"));
        let short = cid::multihash::Multihash::<64>::wrap(BLAKE3, &[7; 16]).unwrap();
        let short = cid::Cid::new_v1(RAW, short).to_string();
        assert!(short.parse::<Cid>().unwrap_err().to_string().contains("16 bytes"));
        let v0 = cid::Cid::new_v0(cid::multihash::Multihash::<64>::wrap(0x12, &[7; 32]).unwrap()).unwrap();
        assert!(Cid::from_bytes(&v0.to_bytes())
            .unwrap_err()
            .to_string()
            .contains("CIDv0"));
    }

    #[test]
    fn test_cid_inside_object_is_a_tag_42_link() {
        let cid = Cid::of_bytes(b"blob");
        let encoded = canonical::encode(&cid).unwrap();
        assert_eq!(&encoded[..2], &[0xd8, 0x2a]);
        assert_eq!(canonical::decode::<Cid>(&encoded).unwrap(), cid);
    }
}
