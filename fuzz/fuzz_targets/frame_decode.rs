//! Wire frames from the peer: every message type, whole and fed a byte at a time.
#![no_main]

use bytes::BytesMut;
use ewii_common::frame::{self, Control, Enrol, QueryHead};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut b = BytesMut::from(data);
    while let Ok(Some(_)) = frame::decode::<Control>(&mut b) {}
    let mut b = BytesMut::from(data);
    while let Ok(Some(_)) = frame::decode::<Enrol>(&mut b) {}
    let mut b = BytesMut::new();
    for byte in data {
        b.extend_from_slice(&[*byte]);
        if frame::decode::<QueryHead>(&mut b).is_err() {
            break;
        }
    }
});
