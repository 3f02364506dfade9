//! `ward demo --once` exits 0 on a machine with Envoy: what the README's
//! first command shows is checked in the normal test run.

use std::process::Command;

#[test]
fn demo_once_passes_every_check() {
    let envoy =
        ward::local::find_envoy(None).expect("Envoy 1.40 is required: run ./dev, or set ENVOY_BIN");
    let out = Command::new(env!("CARGO_BIN_EXE_ward"))
        .args([
            "demo",
            "--once",
            "--xds-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .arg("--envoy")
        .arg(&envoy)
        .env("WARD_LOG", "warn")
        .output()
        .expect("ward runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ward demo --once failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("All checks passed."), "{stdout}");
    assert!(!stdout.contains("[FAIL]"), "{stdout}");
    for claim in [
        "client app → client sidecar → mTLS → server sidecar → server app",
        "refuses plaintext",
        "foreign CA",
        "spiffe://cluster.local/ns/demo/sa/server",
        "spiffe://cluster.local/ns/demo/sa/client",
    ] {
        assert!(
            stdout.contains(claim),
            "demo output lacks {claim:?}:\n{stdout}"
        );
    }
}
