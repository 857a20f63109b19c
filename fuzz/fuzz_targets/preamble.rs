//! The device's preamble frame, as the proxy decodes it.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = scm_proto::preamble::Preamble::decode(data);
});
