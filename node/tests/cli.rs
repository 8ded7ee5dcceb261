//! The command line refuses bad configuration with a message that names the key, and prints a complete
//! example configuration that it accepts.

use std::process::Command;

fn campanile(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_campanile"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn config_example_is_printed_and_accepted_by_the_deploy_example() {
    let out = campanile(&["config", "example"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for key in [
        "[node]",
        "[http]",
        "[sip]",
        "[trunk]",
        "[dialer]",
        "[simcity]",
    ] {
        assert!(text.contains(key), "example lacks {key}");
    }
}

#[test]
fn a_bad_config_file_stops_the_node_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[trunk]\nmax_channels = 0\n").unwrap();
    let out = campanile(&[
        "up",
        "--config",
        path.to_str().unwrap(),
        "--data",
        dir.path().join("d").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("trunk.max_channels"), "{err}");

    std::fs::write(&path, "[dialer]\nring_timeot_s = 3\n").unwrap();
    let out = campanile(&["up", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ring_timeot_s"), "{err}");
}

#[test]
fn the_deploy_example_config_passes_config_check() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/campanile.toml");
    let out = campanile(&["config", "check", path]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "deploy/campanile.toml rejected: {err}"
    );
}

#[test]
fn config_check_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[sip]\nlisten = \"not an address\"\n").unwrap();
    let out = campanile(&["config", "check", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen"), "{err}");
}

#[test]
fn certs_init_and_issue_make_a_node_folder_and_refuse_to_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let node = dir.path().join("node1");
    let out = campanile(&["certs", "init", "--out", ca.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = campanile(&[
        "certs",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--node-id",
        "1",
        "--host",
        "127.0.0.1",
        "--out",
        node.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["ca.pem", "node.pem", "node.key"] {
        assert!(node.join(f).exists(), "{f} missing");
    }
    let mode = std::fs::metadata(node.join("node.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let again = campanile(&["certs", "init", "--out", ca.to_str().unwrap()]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert!(
        !err.contains("PRIVATE KEY"),
        "a key leaked into an error: {err}"
    );
}

/// `pacer_send = "raw"` on a host that does not give the process CAP_NET_RAW: the pacer says why
/// and sends with io_uring instead, and every stream still plays. Run without the capability
/// (`setpriv` drops it from root's bounding set; an ordinary user never has it).
#[test]
fn raw_sending_without_cap_net_raw_says_why_and_falls_back_to_io_uring() {
    let exe = env!("CARGO_BIN_EXE_campanile");
    let bench = [
        "bench",
        "media",
        "--streams",
        "20",
        "--seconds",
        "1",
        "--send",
        "raw",
    ];
    // SAFETY: geteuid has no preconditions.
    let out = if unsafe { libc::geteuid() } == 0 {
        Command::new("setpriv")
            .args([
                "--bounding-set",
                "-net_raw",
                "--inh-caps",
                "-net_raw",
                "--",
                exe,
            ])
            .args(bench)
            .output()
            .expect("setpriv (util-linux) drops the capability")
    } else {
        Command::new(exe).args(bench).output().unwrap()
    };
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    // Logged plainly, as journald stores it: the reason is a greppable `error=` field.
    assert!(
        stderr.contains("error=cannot open a raw socket (it needs CAP_NET_RAW)"),
        "no reason given: {stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a log that is not a terminal"
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("| 20 |"))
        .unwrap_or_else(|| panic!("no row for 20 streams: {stdout}"));
    assert!(row.contains("| io_uring (raw refused) |"), "{row}");
    // 20 streams for 1 s at 50 packets a second each: they played (a wide margin for timing).
    let packets_per_s: f64 = row
        .split('|')
        .nth(3)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(packets_per_s > 500.0, "{row}");
}
