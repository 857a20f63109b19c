//! The Security server's JSON bodies, decoded strictly (the first byte picks the type).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    scm_security::fuzz::api_body(data);
});
