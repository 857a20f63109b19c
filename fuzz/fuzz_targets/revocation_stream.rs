//! The revocation stream's NDJSON reader, lines across chunk boundaries.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    scm_proxy::proxy::fuzz::revocation_stream(data);
});
