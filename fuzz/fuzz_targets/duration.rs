//! Every duration flag's parser.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = scm_proto::duration::parse_duration(text);
    }
});
