//! The verifiable-effects readers (`tartarus-effects`): the strict DAG-CBOR decoder, CIDs in binary and
//! text form, envelopes, the signed objects, dataset manifests, CAR files and episode bundles — all of
//! which arrive from tenants, evaluators or exported files.
//!
//! Properties: whatever the strict decoder accepts re-encodes to exactly the same bytes (one value, one
//! encoding — the contract the ids and signatures rest on), also through every typed reader; the id of
//! accepted bytes is the id of the value; a CID reads back from its own binary and text forms; a CAR that
//! reads writes back to one that reads as the same roots and blocks; no reader panics.

#![no_main]

use ipld_core::ipld::Ipld;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tartarus_effects::canonical;
use tartarus_effects::dataset::Manifest;
use tartarus_effects::{
    read_car, verify_episode_car, CarReader, CarWriter, Cid, Envelope, Episode, Receipt, Signal, TraceRecord,
};

/// Typed decoding accepts only bytes the generic decoder accepts too, and both re-encode them exactly.
fn typed<T: DeserializeOwned + Serialize>(data: &[u8], accepted_as_ipld: bool) {
    if let Ok(value) = canonical::decode::<T>(data) {
        assert!(
            accepted_as_ipld,
            "{} accepted bytes the generic decoder refuses",
            std::any::type_name::<T>()
        );
        assert_eq!(canonical::encode(&value).expect("a decoded value encodes"), data);
    }
}

fn objects(data: &[u8]) {
    let ipld = canonical::decode::<Ipld>(data);
    if let Ok(value) = &ipld {
        let encoded = canonical::encode(value).expect("a decoded value encodes");
        assert_eq!(encoded, data, "accepted bytes are not the value's one encoding");
        canonical::validate(data).expect("decode and validate disagree");
        assert_eq!(
            Cid::of_encoded(data).expect("accepted bytes have an id"),
            Cid::of_object(value).expect("a decoded value has an id")
        );
    } else {
        assert!(canonical::validate(data).is_err(), "decode and validate disagree");
        assert!(Cid::of_encoded(data).is_err());
    }
    let accepted = ipld.is_ok();
    typed::<Envelope>(data, accepted);
    typed::<Receipt>(data, accepted);
    typed::<TraceRecord>(data, accepted);
    typed::<Episode>(data, accepted);
    typed::<Signal>(data, accepted);
    typed::<Manifest>(data, accepted);
    if let Ok(envelope) = Envelope::decode(data) {
        assert_eq!(envelope.encode().expect("a decoded envelope encodes"), data);
    }
    if let Ok(record) = TraceRecord::from_bytes(data) {
        assert_eq!(record.to_bytes().expect("a decoded record encodes"), data);
    }
    if let Ok(manifest) = Manifest::from_bytes(data) {
        assert_eq!(manifest.to_bytes().expect("a decoded manifest encodes"), data);
    }
}

fn cids(data: &[u8]) {
    if let Ok(cid) = Cid::from_bytes(data) {
        assert_eq!(cid.to_bytes(), data);
        assert_eq!(
            cid.to_string().parse::<Cid>().expect("a CID reads its own text"),
            cid
        );
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cid) = text.parse::<Cid>() {
            assert_eq!(cid.to_string(), text);
            assert_eq!(
                Cid::from_bytes(&cid.to_bytes()).expect("a CID reads its own bytes"),
                cid
            );
        }
    }
}

fn cars(data: &[u8]) {
    let Ok(car) = read_car(data) else {
        // The streaming reader refuses it as well, at the latest at the block the whole reader refused.
        if let Ok(reader) = CarReader::new(data) {
            assert!(
                reader.into_iter().any(|block| block.is_err()),
                "read_car and CarReader disagree"
            );
        }
        return;
    };
    assert!(!car.roots.is_empty());
    let mut writer = CarWriter::new(Vec::new(), &car.roots).expect("the roots of a read CAR write");
    for (cid, bytes) in &car.blocks {
        writer.block(cid, bytes).expect("a verified block writes");
    }
    let written = writer.finish().expect("writing to memory");
    assert_eq!(read_car(written.as_slice()).expect("a written CAR reads"), car);
    let _ = verify_episode_car(data, None);
}

fuzz_target!(|data: &[u8]| {
    objects(data);
    cids(data);
    cars(data);
});
