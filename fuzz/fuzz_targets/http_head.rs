//! The http mode's rewrite of a request head, with its properties asserted.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    scm_proxy::proxy::fuzz::http_head(data);
});
