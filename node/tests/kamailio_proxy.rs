//! Kamailio, a SIP proxy we did not write, record-routes between `campanile call` and SIPp: our ACK,
//! re-INVITE and BYE must follow the route set learned from Record-Route (RFC 3261 §12.1.2, §12.2.1.1)
//! through the proxy, which the SIPp scenario checks on the Via of each request.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use common::{campanile_call, free_udp_port, start_sipp_with, wait_until_bound, ReapGroup};

/// Where the installed Kamailio keeps its modules.
fn kamailio_modules() -> String {
    let out = Command::new("dpkg")
        .args(["-L", "kamailio"])
        .output()
        .expect("dpkg");
    let list = String::from_utf8_lossy(&out.stdout);
    let sl = list
        .lines()
        .find(|l| l.ends_with("/modules/sl.so"))
        .expect("kamailio is installed by the test command (Debian package kamailio)");
    sl.trim_end_matches("sl.so").to_string()
}

#[test]
fn ack_reinvite_and_bye_follow_the_record_route_through_kamailio() {
    let dir = tempfile::tempdir().unwrap();
    let kam_port = free_udp_port();
    let sipp = start_sipp_with("record_route.xml", &[("@KAM_PORT@", kam_port.to_string())]);
    let cfg = format!(
        r#"#!KAMAILIO
listen=udp:127.0.0.1:{kam_port}
children=1
disable_tcp=yes
auto_aliases=no
log_stderror=yes
debug=1
mpath="{modules}"
loadmodule "sl.so"
loadmodule "tm.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "textops.so"
loadmodule "maxfwd.so"
loadmodule "siputils.so"
modparam("rr", "enable_full_lr", 1)

request_route {{
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    if (has_totag()) {{
        if (loose_route()) {{ t_relay(); exit; }}
        if (is_method("ACK")) {{ if (t_check_trans()) {{ t_relay(); }} exit; }}
        sl_send_reply("404", "Not here"); exit;
    }}
    if (is_method("CANCEL")) {{ if (t_check_trans()) {{ t_relay(); }} exit; }}
    record_route();
    $du = "sip:127.0.0.1:{sipp_port}";
    t_relay();
}}
"#,
        modules = kamailio_modules(),
        sipp_port = sipp.port,
    );
    let cfg_path = dir.path().join("kamailio.cfg");
    std::fs::write(&cfg_path, cfg).unwrap();
    let log = std::fs::File::create(dir.path().join("kamailio.log")).unwrap();
    let kamailio = Command::new("kamailio")
        .args(["-DD", "-E", "-f"])
        .arg(&cfg_path)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("kamailio");
    let _kamailio = ReapGroup(kamailio);
    wait_until_bound(kam_port, "kamailio", Some(&dir.path().join("kamailio.log")));

    let mut sipp = sipp;
    let (stdout, ok, stderr) = campanile_call(kam_port, &["--reinvite-after", "0.5"], &[]);
    assert!(ok && stdout == "heard", "{stdout}\n{stderr}");
    let status = sipp.wait();
    assert!(
        status.success(),
        "SIPp missed the re-INVITE or saw a request that bypassed the proxy: {}",
        sipp.errors()
    );
    assert_eq!(sipp.stat("SuccessfulCall(C)"), Some(1));
}
