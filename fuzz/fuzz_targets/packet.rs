//! The XDP program's packet parser, built for the host.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = proxy_common::parse::parse(data);
});
