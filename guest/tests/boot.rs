//! Boots the real guest kernel: the test binary runs itself inside it (so packing a host binary
//! with its `ldd` libraries is proven too), reports the guest's view and exits with a chosen code.

use std::ffi::OsStr;
use std::time::Duration;

use scm_guest::{Guest, GuestError};

/// Set inside the guest: this binary is the guest's command, not the host's test.
const CHILD: &str = "SCM_GUEST_TEST_CHILD";

/// A `Guest`, or `None` after a loud skip (a failure under CI) where the host lacks qemu & co.
fn guest(test: &str) -> Option<Guest> {
    match Guest::new() {
        Ok(g) => Some(g),
        Err(e @ GuestError::Unavailable { .. }) => {
            scm_netns::skip::skip(
                test,
                "qemu, busybox, cpio and the Debian kernel package",
                &e.to_string(),
            );
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

/// The `Max open files` line of /proc/self/limits, soft and hard.
fn open_files_limits() -> String {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Inside the guest: prints what the host test checks, and exits 42.
fn child() -> ! {
    let ulp = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap_or_default();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("child: ulp=[{}] release=[{}]", ulp.trim(), release.trim());
    println!(
        "child: env={}",
        std::env::var("SCM_GUEST_TEST_WORD").unwrap_or_default()
    );
    println!("child: host_has_ktls={}", scm_guest::host_has_ktls());
    println!("child: {}", open_files_limits());
    std::process::exit(42)
}

#[test]
fn a_host_binary_runs_in_the_guest_kernel_with_tls_and_its_exit_code_comes_back() {
    if std::env::var_os(CHILD).is_some() {
        child();
    }
    let Some(guest) =
        guest("a_host_binary_runs_in_the_guest_kernel_with_tls_and_its_exit_code_comes_back")
    else {
        return;
    };
    let exe = std::env::current_exe().expect("current_exe");
    let release = guest.kernel_release().to_owned();
    let run = guest
        .file(&exe)
        .module("tls")
        .env(CHILD, "1")
        .env("SCM_GUEST_TEST_WORD", "it's $quoted")
        .timeout(Duration::from_secs(240))
        .run(&[
            exe.as_os_str(),
            OsStr::new("--exact"),
            OsStr::new(
                "a_host_binary_runs_in_the_guest_kernel_with_tls_and_its_exit_code_comes_back",
            ),
            OsStr::new("--nocapture"),
        ])
        .unwrap_or_else(|e| panic!("guest run failed: {e}"));
    eprintln!("guest output:\n{}", run.output);
    assert_eq!(run.exit_code, 42, "output: {}", run.output);
    assert_eq!(run.kernel_release, release);
    assert!(
        run.kernel_release.starts_with("6.1."),
        "{}",
        run.kernel_release
    );
    assert!(
        run.output.contains(&format!("release=[{release}]")),
        "the command saw another kernel: {}",
        run.output
    );
    let ulp = run
        .output
        .lines()
        .find_map(|l| l.split_once("child: ulp=[").map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("no ulp line: {}", run.output));
    assert!(
        ulp.split([' ', ']']).any(|u| u == "tls"),
        "tls not in tcp_available_ulp: {ulp}"
    );
    assert!(
        run.output.contains("child: env=it's $quoted\n"),
        "{}",
        run.output
    );
    assert!(
        run.output.contains("child: host_has_ktls=true\n"),
        "{}",
        run.output
    );
    // The host's open-file limits, not the 1024 the kernel gives init: tests that pass on the
    // host (the supervisor's with hundreds of connections) must not fail on the harness.
    let limits = open_files_limits();
    assert!(
        run.output.contains(&format!("child: {limits}\n")),
        "want the host's {limits:?} in the guest: {}",
        run.output
    );
}

#[test]
fn a_busybox_command_gives_its_exit_code_and_output_and_a_hung_guest_times_out() {
    let Some(guest) =
        guest("a_busybox_command_gives_its_exit_code_and_output_and_a_hung_guest_times_out")
    else {
        return;
    };
    let run = guest
        .clone()
        .timeout(Duration::from_secs(240))
        .run(&[
            OsStr::new("sh"),
            OsStr::new("-c"),
            OsStr::new("echo out; echo err >&2; lsmod | grep -c tls; exit 3"),
        ])
        .unwrap_or_else(|e| panic!("guest run failed: {e}"));
    // No module asked for: none is loaded (grep counts 0 lines).
    assert_eq!(run.output, "out\nerr\n0\n");
    assert_eq!(run.exit_code, 3);

    let err = guest
        .timeout(Duration::from_secs(2))
        .run(&[OsStr::new("sleep"), OsStr::new("1000")])
        .expect_err("a 2 s bound must stop a guest that sleeps 1000 s");
    assert!(matches!(err, GuestError::Timeout { .. }), "{err}");
}

#[test]
fn bad_modules_and_files_are_refused_before_booting() {
    let Some(guest) = guest("bad_modules_and_files_are_refused_before_booting") else {
        return;
    };
    let err = guest
        .clone()
        .module("no_such_module")
        .run(&[OsStr::new("true")])
        .expect_err("unknown module");
    assert!(matches!(err, GuestError::NoSuchModule { .. }), "{err}");
    let err = guest
        .clone()
        .file("/no/such/file")
        .run(&[OsStr::new("true")])
        .expect_err("missing file");
    assert!(matches!(err, GuestError::NoSuchFile { .. }), "{err}");
    assert!(matches!(guest.run(&[]), Err(GuestError::NoCommand)));
}
