//! README's first command: `campanile demo` runs three nodes in drill mode (three data-centre
//! labels, QUIC with mutual TLS between them) sharing one simulated city, registers citizens through
//! one node, sends the alert through another, and every node ends holding the same outcome. With
//! the always-answer city every citizen confirms, and the city's own log agrees.

use std::process::Command;

use campanile_chaos_tests::*;

#[test]
fn the_demo_runs_a_three_node_alert_to_the_end() {
    let dir = test_dir();
    // Node N takes the HTTP and SIP ports of node 1 plus N-1.
    let ports = free_port_runs(3, 3);
    let out = Command::new(campanile_bin())
        .args([
            "demo",
            "--citizens",
            "40",
            "--profile",
            "always-answer",
            "--data",
            dir.path().join("demo").to_str().unwrap(),
            "--http",
            &ports[0].to_string(),
            "--sip",
            &ports[1].to_string(),
            "--city",
            &ports[2].to_string(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for needle in [
        "3 nodes",
        "dc-nord",
        "dc-centro",
        "dc-sud",
        "Registered 40 citizens",
        "completed",
        "40 targeted, 40 confirmed",
        "logged 40 key presses of 1",
        "every node holds the same outcome: yes",
    ] {
        assert!(
            stdout.contains(needle),
            "`{needle}` missing from the demo's output:\n{stdout}\n{stderr}"
        );
    }
}
