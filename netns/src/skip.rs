//! The one rule for a test that needs what a machine may lack (root, PostgreSQL, slapd, PyJWT):
//! outside CI it skips, visibly; under CI (`CI=true` or `CI=1`, as CI services set it) it fails.

use std::io::Write as _;

/// Whether this runs under CI, where a missing requirement is a failure rather than a skip.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skips `test` for want of `needs` (`why` says what to install or how to run it), or panics
/// under CI. The banner goes to the stderr handle itself: libtest captures the `eprintln!` of a
/// passing test, and a skip must be seen in the test output.
pub fn skip(test: &str, needs: &str, why: &str) {
    assert!(
        !ci(),
        "{test}: needs {needs} and CI is set (CI=true or CI=1), which forbids skipping: {why}"
    );
    let _ = writeln!(
        std::io::stderr(),
        "\n## SKIPPED {test}: needs {needs}: {why}\n## (with CI=true or CI=1 this is a failure)\n"
    );
}
