//! The shim contract (`tartarus-shim/src/protocol.rs`): one line, decoded as every message type the server
//! and the shim read from each other.
//!
//! Properties, for each type the line decodes as: encoding the value gives exactly one line, with its
//! version first; that line decodes to the same value (what one side writes the other reads back as it
//! was meant); a line of another version is refused as such, never read.

#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tartarus_shim::protocol::{
    self, DirListing, Done, ExecOutput, FileData, Handshake, Isolated, ReplyError, ReplyLine, RequestLine,
    ResultRecord, Status, StreamLine, Throttled, VERSION,
};

fn round_trip<T>(line: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let value = match protocol::decode::<T>(line) {
        Ok(value) => value,
        Err(ReplyError::Version(e)) => {
            assert_ne!(e.found, VERSION, "a line of this version refused as another");
            return;
        }
        Err(_) => return,
    };
    let encoded = protocol::encode(&value);
    assert_eq!(encoded.last(), Some(&b'\n'), "an encoded message ends its line");
    assert!(
        !encoded[..encoded.len() - 1].contains(&b'\n'),
        "an encoded message is one line: {}",
        String::from_utf8_lossy(&encoded)
    );
    assert!(
        encoded.starts_with(format!("{{\"v\":{VERSION}").as_bytes()),
        "the version comes first: {}",
        String::from_utf8_lossy(&encoded)
    );
    let again: T = protocol::decode(&encoded[..encoded.len() - 1]).unwrap_or_else(|e| {
        panic!(
            "{} does not read back its own encoding {}: {e}",
            std::any::type_name::<T>(),
            String::from_utf8_lossy(&encoded)
        )
    });
    assert_eq!(again, value, "{}", String::from_utf8_lossy(&encoded));
}

fuzz_target!(|line: &[u8]| {
    // The shim reads a request up to its newline; the server reads replies and events line by line.
    let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
    round_trip::<RequestLine>(line);
    round_trip::<ReplyLine<Done>>(line);
    round_trip::<ReplyLine<Status>>(line);
    round_trip::<ReplyLine<Isolated>>(line);
    round_trip::<ReplyLine<Throttled>>(line);
    round_trip::<ReplyLine<ExecOutput>>(line);
    round_trip::<ReplyLine<FileData>>(line);
    round_trip::<ReplyLine<DirListing>>(line);
    round_trip::<StreamLine>(line);
    round_trip::<Handshake>(line);
    round_trip::<ResultRecord>(line);
    // A reply of this version is a value or a coded refusal, never a version error.
    if let Ok(reply) = protocol::decode::<ReplyLine<Done>>(line) {
        assert!(!matches!(reply.into_result(), Err(ReplyError::Version(_))));
    }
});
