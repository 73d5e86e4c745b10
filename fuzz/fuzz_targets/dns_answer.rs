//! cargo-fuzz entry for the `dns_answer` target; the body is in fuzz/src/lib.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cutover_fuzz::run("dns_answer", data));
