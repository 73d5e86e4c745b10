//! cargo-fuzz entry for the `config` target; the body is in fuzz/src/lib.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cutover_fuzz::run("config", data));
