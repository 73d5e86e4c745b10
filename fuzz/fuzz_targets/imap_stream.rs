//! cargo-fuzz entry for the `imap_stream` target; the body is in fuzz/src/lib.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cutover_fuzz::run("imap_stream", data));
