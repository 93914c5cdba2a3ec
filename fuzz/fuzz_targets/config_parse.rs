//! Both configuration files, from any text.
#![no_main]

use ewii::config::{ClientConfig, HubConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<ClientConfig>();
        let _ = text.parse::<HubConfig>();
    }
});
