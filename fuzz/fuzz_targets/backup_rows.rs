//! A snapshot table's rows, parsed and checked as a restore does.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    scm_security::fuzz::backup_rows(data);
});
