//! `p2prig doctor` on a host missing things: each missing prerequisite is a FAIL line with the
//! command that fixes it, and the exit status says a run would fail.

use std::process::Command;

#[test]
fn a_host_without_tools_gets_a_fail_line_and_a_fix_for_each() {
    let empty_path = tempfile::tempdir().expect("tempdir");
    let cache = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_p2prig"))
        .arg("doctor")
        .env("PATH", empty_path.path())
        .env("P2PRIG_CACHE", cache.path())
        .env_remove("QEMU")
        .env_remove("CHROME")
        .output()
        .expect("running p2prig doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for (line, fix) in [
        ("FAIL cargo", "fix: install a Rust toolchain with rustup"),
        ("FAIL tshark", "fix: make deps"),
        (
            "warn browser",
            "fix: make deps (Debian's chromium), or CHROME=",
        ),
        (
            "warn qemu             not built yet",
            "fix: p2prig build qemu",
        ),
    ] {
        assert!(text.contains(line), "no `{line}` in:\n{text}");
        assert!(text.contains(fix), "no `{fix}` in:\n{text}");
    }
    assert!(
        text.contains("prerequisite(s) missing: fix the FAIL lines above"),
        "{text}"
    );
}
