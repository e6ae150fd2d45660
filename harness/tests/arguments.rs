//! Bad arguments are refused before anything is built or downloaded, with a message naming
//! what is wrong and what is right.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs p2prig with an empty cache; returns (exit code, stderr, whether the cache got a build).
fn run(args: &[&str]) -> (Option<i32>, String, bool) {
    let cache = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_p2prig"))
        .args(args)
        .env("P2PRIG_CACHE", cache.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("p2prig starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("p2prig {args:?} was still running after 20 s: it started building");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    let built = ["qemu", "kernel", "rdma-core", "downloads"]
        .iter()
        .any(|d| cache.path().join(d).exists());
    (status.code(), stderr, built)
}

#[test]
fn an_unknown_flavor_or_variant_is_refused_before_any_build() {
    for args in [
        &["run", "--kernel", "nosuch"][..],
        &["build", "all", "--kernel", "nosuch"],
        &["bench", "--kernel", "nosuch"],
        &["shell", "--kernel", "nosuch"],
    ] {
        let (code, stderr, built) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("no kernel flavor `nosuch`; known: "),
            "{args:?}: {stderr}"
        );
        assert!(!built, "{args:?} built or downloaded something first");
    }
    let (code, stderr, built) = run(&["run", "--kernel", "v1:weird"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("unknown kernel variant `weird`: use tiny or debug"),
        "{stderr}"
    );
    assert!(!built);
}

#[test]
fn a_bad_splat_pattern_or_config_item_is_refused_before_any_build() {
    let (code, stderr, built) = run(&["run", "--allow-splat", "("]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--allow-splat `(` is not a regular expression"),
        "{stderr}"
    );
    assert!(!built);
    let (code, stderr, built) = run(&["run", "--configitem", "CONFIG_X=y"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("apply to your own tree"), "{stderr}");
    assert!(!built);
}
