//! cargo-fuzz entry for the `web_config` target; the body is in fuzz/src/lib.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cutover_fuzz::run("web_config", data));
