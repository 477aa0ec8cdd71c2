//! Team use: state and lock in S3 (conditional writes), shared by runs from separate working
//! directories, as two operators' laptops or CI would.

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Emu, Out, Run};

const STATE: &str = "s3://team-state/pgdr";

fn with_state<'a>(state: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--state", state];
    v.extend_from_slice(args);
    v
}

fn s3(run: &Run, args: &[&str]) -> Out {
    run.pgdr(&with_state(STATE, args))
}

fn s3_ok(run: &Run, args: &[&str]) -> Out {
    let o = s3(run, args);
    assert_eq!(o.code, 0, "pgdr {args:?} failed: {o:?}");
    o
}

/// A bucket ready for state, as `pgdr state init` makes it.
fn init(emu: &Emu) -> Run {
    let run = Run::new(emu);
    run.ok(&["state", "init", "s3://team-state"]);
    run
}

/// The environments listed at the S3 state, as JSON.
fn listing(run: &Run) -> Vec<Value> {
    s3_ok(run, &["status", "--output", "json"]).json()["environments"].as_array().cloned().unwrap_or_default()
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn locked(run: &Run) -> bool {
    listing(run).iter().any(|e| e["env"] == "dev" && e["locked_by"].is_string())
}

/// What a plan would change: zero means the run before converged.
fn plan_changes(run: &Run) -> u64 {
    let p = s3_ok(run, &["plan", "--env", "dev", "--output", "json"]).json();
    let t = &p["totals"];
    assert!(t["keep"].as_u64().is_some_and(|k| k > 0), "a plan of the built environment: {p}");
    ["create", "adopt", "change", "delete"].iter().map(|k| t[k].as_u64().expect("totals")).sum()
}

#[test]
fn two_operators_one_environment_exactly_one_runs() {
    let emu = Emu::start();
    let (a, b) = (init(&emu), Run::new(&emu));
    let spawn = |r: &Run| r.cmd(&with_state(STATE, &["up", "--env", "dev"])).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (ca, cb) = (spawn(&a), spawn(&b));
    let (oa, ob) = (ca.wait_with_output().unwrap(), cb.wait_with_output().unwrap());
    let codes = [oa.status.code(), ob.status.code()];
    let loser = if codes == [Some(0), Some(1)] {
        (&b, ob)
    } else {
        assert_eq!(
            codes,
            [Some(1), Some(0)],
            "exactly one runs: {} / {}",
            String::from_utf8_lossy(&oa.stderr),
            String::from_utf8_lossy(&ob.stderr)
        );
        (&a, oa)
    };
    let err = String::from_utf8_lossy(&loser.1.stderr);
    assert!(err.contains("is locked by") && err.contains("pgdr up") && err.contains("pid"), "names the holder: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    // Afterwards the other operator's run finds nothing to do.
    let again = s3_ok(loser.0, &["up", "--env", "dev", "--output", "json"]).json();
    assert_eq!(again["totals"]["create"], 0, "{again}");
    assert_eq!(plan_changes(loser.0), 0);
    assert!(!locked(loser.0), "the lock is released");
}

#[test]
fn kill_9_while_holding_the_s3_lock_then_unlock_and_rerun_converges() {
    let emu = Emu::start();
    let (a, b) = (init(&emu), Run::new(&emu));
    emu.config(r#"{"rds_hold": {"create_s": 20, "modify_s": 1}}"#);
    let mut child = a.cmd(&with_state(STATE, &["up", "--env", "dev"])).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_until("the primary's create", 60, || emu.calls().iter().any(|c| c["op"] == "CreateDBInstance"));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    emu.config(r#"{"rds_hold": null}"#);
    // The other operator sees the holder; the lock is not taken over silently.
    let o = s3(&b, &["up", "--env", "dev"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("is locked by") && o.stderr.contains("pgdr up"), "{o:?}");
    // Without a terminal and without --yes, unlock refuses and keeps the lock.
    let o = s3(&b, &["unlock", "--env", "dev"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(locked(&b));
    let o = s3_ok(&b, &["unlock", "--env", "dev", "--yes"]);
    assert!(o.stderr.contains("removed the lock"), "{o:?}");
    s3_ok(&b, &["up", "--env", "dev"]);
    assert_eq!(plan_changes(&b), 0, "converged after the kill");
}

#[test]
fn a_forced_unlock_makes_the_first_runs_next_write_fail_and_lose_nothing() {
    let emu = Emu::start();
    let (a, b) = (init(&emu), Run::new(&emu));
    emu.config(r#"{"rds_hold": {"create_s": 15, "modify_s": 1}}"#);
    let first = a.cmd(&with_state(STATE, &["up", "--env", "dev"])).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_until("the primary's create", 60, || emu.calls().iter().any(|c| c["op"] == "CreateDBInstance"));
    // Someone forces the lock and writes the state while the first run waits on RDS.
    let h = s3_ok(&b, &["state", "history", "--env", "dev", "--output", "json", "--limit", "1000"]).json();
    let oldest = h["versions"].as_array().unwrap().last().unwrap()["version"].as_str().unwrap().to_owned();
    s3_ok(&b, &["unlock", "--env", "dev", "--yes"]);
    // The first run may still be recording other steps' creates (they run beside the wait): a
    // restore that meets such a write says so and changes nothing, and is run again, as it asks.
    let restore = ["state", "restore", "--env", "dev", "--version", &oldest, "--yes"];
    let mut o = s3(&b, &restore);
    for _ in 0..10 {
        if o.code == 0 || !o.stderr.contains("run it again") {
            break;
        }
        o = s3(&b, &restore);
    }
    assert_eq!(o.code, 0, "restore: {o:?}");
    let out = first.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "the first run cannot finish on a state it no longer owns: {err}");
    assert!(err.contains("compare-and-swap") && err.contains("pgdr adopt"), "says how to reconcile: {err}");
    // Its state is kept locally, 0600, with what it knew; the S3 state is the adopt's.
    let rec_dir = a.dir.path().join(".pgdr-recovery");
    let kept: Vec<_> = std::fs::read_dir(&rec_dir).expect("a recovery file").flatten().collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(kept[0].metadata().unwrap().permissions().mode() & 0o777, 0o600);
    let recovered: Value = serde_json::from_slice(&std::fs::read(kept[0].path()).unwrap()).unwrap();
    assert!(recovered["resources"]["primary/us-east-1/instance"].is_object(), "the recovery names the primary: {recovered}");
    let history = s3_ok(&b, &["state", "history", "--env", "dev", "--output", "json"]).json();
    let top = history["versions"][0]["command"].as_str().unwrap_or("");
    assert!(top.starts_with("pgdr state restore"), "nothing overwrote the restore's state: {history}");
    assert!(!locked(&b), "no lock left behind");
    emu.config(r#"{"rds_hold": null}"#);
    // Reconcile as the message says: adopt from AWS, then up.
    s3_ok(&b, &["adopt", "--env", "dev"]);
    s3_ok(&b, &["up", "--env", "dev"]);
    assert_eq!(plan_changes(&b), 0);
}

#[test]
fn a_long_run_refreshes_its_lock() {
    let emu = Emu::start();
    let (a, b) = (init(&emu), Run::new(&emu));
    emu.config(r#"{"rds_hold": {"create_s": 12, "modify_s": 1}}"#);
    let mut cmd = a.cmd(&with_state(STATE, &["up", "--env", "dev"]));
    let child = cmd.env("PGDR_LOCK_HEARTBEAT_SECONDS", "1").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_until("the lock", 60, || locked(&b));
    let t0 = Instant::now();
    let mut silences = Vec::new();
    while t0.elapsed() < Duration::from_secs(6) {
        let l = listing(&b);
        if let Some(s) = l.iter().find(|e| e["env"] == "dev").and_then(|e| e["lock_silent_s"].as_u64()) {
            silences.push(s);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(silences.len() >= 5, "{silences:?}");
    assert!(silences.iter().all(|s| *s <= 3), "heard of every second, not only at the start: {silences:?}");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn migrate_directory_to_s3_and_back_with_identical_content() {
    let emu = Emu::start();
    let run = init(&emu);
    run.ok(&["up", "--env", "dev"]);
    let original: Value = serde_json::from_slice(&std::fs::read(run.state_file("dev")).unwrap()).unwrap();
    let m = run.ok(&["state", "migrate", "--env", "dev", "--to", STATE, "--output", "json"]).json();
    assert!(!run.state_file("dev").exists(), "the directory copy is renamed");
    assert!(run.dir.path().join(m["old_copy"].as_str().unwrap()).exists(), "the old copy is kept: {m}");
    assert!(!run.state_dir().join("dev.lock").exists() && !locked(&run), "both locks released");
    // The S3 copy works as the state: nothing to change.
    assert_eq!(plan_changes(&run), 0);
    let m = s3_ok(&run, &["state", "migrate", "--env", "dev", "--to", ".pgdr-back", "--output", "json"]).json();
    assert!(m["old_copy"].as_str().unwrap().starts_with("s3://team-state/pgdr/dev.json.migrated-"), "{m}");
    let back: Value = serde_json::from_slice(&std::fs::read(run.dir.path().join(".pgdr-back/dev.json")).unwrap()).unwrap();
    assert_eq!(back, original, "identical content after directory → S3 → directory");
    assert!(listing(&run).is_empty(), "S3 holds no current state of dev any more");
    // A destination that holds a state already is refused, and nothing changes.
    run.ok(&["--state", ".pgdr-back", "state", "migrate", "--env", "dev", "--to", STATE]);
    std::fs::create_dir_all(run.state_dir()).unwrap();
    std::fs::write(run.state_file("dev"), serde_json::to_vec(&original).unwrap()).unwrap();
    let o = run.pgdr(&["state", "migrate", "--env", "dev", "--to", STATE]);
    assert!(o.code == 1 && o.stderr.contains("already holds a state"), "{o:?}");
    assert!(run.state_file("dev").exists());
}

#[test]
fn history_and_restore_round_trip() {
    let emu = Emu::start();
    let run = init(&emu);
    s3_ok(&run, &["up", "--env", "dev"]);
    let h = s3_ok(&run, &["state", "history", "--env", "dev", "--output", "json", "--limit", "1000"]).json();
    let versions = h["versions"].as_array().unwrap().clone();
    assert!(versions.len() >= 3, "{h}");
    assert_eq!(versions.iter().filter(|v| v["latest"] == true).count(), 1, "{h}");
    assert!(versions.iter().all(|v| v["command"] == "pgdr up" && v["who"].is_string()), "{h}");
    let current = versions[0]["version"].as_str().unwrap().to_owned();
    let oldest = versions.last().unwrap()["version"].as_str().unwrap().to_owned();
    let full = listing(&run)[0]["resources"].as_u64().unwrap();
    let r = s3_ok(&run, &["state", "restore", "--env", "dev", "--version", &oldest, "--yes", "--output", "json"]).json();
    let restored = listing(&run)[0]["resources"].as_u64().unwrap();
    assert_eq!(Some(restored), r["resources"].as_u64(), "{r}");
    assert!(restored < full, "the oldest version is an early state: {restored} of {full}");
    let h = s3_ok(&run, &["state", "history", "--env", "dev", "--output", "json"]).json();
    assert!(h["versions"][0]["command"].as_str().unwrap().starts_with("pgdr state restore"), "{h}");
    s3_ok(&run, &["state", "restore", "--env", "dev", "--version", &current, "--yes"]);
    assert_eq!(listing(&run)[0]["resources"].as_u64(), Some(full));
    assert_eq!(plan_changes(&run), 0, "restoring the newest version gives back the converged state");
    let o = s3(&run, &["state", "restore", "--env", "dev", "--version", "no-such-version", "--yes"]);
    assert_eq!(o.code, 1, "{o:?}");
}

#[test]
fn s3_faults_before_and_after_the_call_leave_lock_and_state_consistent() {
    let emu = Emu::start();
    let run = init(&emu);
    // 503 before S3 sees the call, and answers dropped after S3 did the work: one S3 call in
    // five (far above what S3 fails; above this the SDK's retry quota runs dry and the run stops,
    // as it should, with the state intact).
    emu.config(r#"{"fail_rate": 0.1, "drop_rate": 0.1, "seed": 7, "fault_services": ["s3"]}"#);
    s3_ok(&run, &["up", "--env", "dev"]);
    let calls = emu.calls();
    let faults = calls.iter().filter(|c| c["service"] == "s3" && c["fault"].is_string()).count();
    assert!(faults >= 3, "faults were injected: {faults}");
    s3_ok(&run, &["up", "--env", "dev"]);
    emu.config(r#"{"fail_rate": 0, "drop_rate": 0, "fault_services": null}"#);
    assert!(!locked(&run), "the lock is released");
    assert_eq!(plan_changes(&run), 0, "the state matches AWS");
}

/// A bucket made without pgdr (no versioning), straight through the emulator.
fn plain_bucket(emu: &Emu, name: &str) {
    let port: u16 = emu.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body = "<CreateBucketConfiguration><LocationConstraint>eu-west-1</LocationConstraint></CreateBucketConfiguration>";
    write!(
        s,
        "PUT /{name} HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: AWS4-HMAC-SHA256 Credential=test/20260101/eu-west-1/s3/aws4_request, SignedHeaders=host, Signature=0\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"), "{out}");
}

#[test]
fn bad_s3_inputs_are_one_line_and_change_nothing() {
    let emu = Emu::start();
    let run = init(&emu);
    let one_line = |o: &Out, needle: &str| {
        assert_eq!(o.code, 1, "{o:?}");
        assert!(o.stderr.contains(needle), "{needle:?} in {o:?}");
        assert_eq!(o.stderr.trim().lines().count(), 1, "one line: {o:?}");
    };
    one_line(&run.pgdr(&["--state", "s3://Bad_Bucket/x", "up", "--env", "dev"]), "valid S3 bucket");
    one_line(&run.pgdr(&["--state", "s3:/team-state", "up", "--env", "dev"]), "--state");
    one_line(&run.pgdr(&["--state", "s3://no-such-bucket/x", "up", "--env", "dev"]), "pgdr state init s3://no-such-bucket");
    plain_bucket(&emu, "plain-bucket");
    one_line(&run.pgdr(&["--state", "s3://plain-bucket/x", "up", "--env", "dev"]), "no versioning");
    let listed = run.ok(&["--state", "s3://plain-bucket/x", "--allow-unversioned", "status", "--output", "json"]).json();
    assert_eq!(listed["environments"], serde_json::json!([]), "nothing was written: {listed}");
    // Access denied, as IAM answers it.
    emu.config(r#"{"throttle": [{"services": ["s3"], "code": "AccessDenied", "status": 403, "times": 1000}]}"#);
    one_line(&s3(&run, &["up", "--env", "dev"]), "docs/reliability.md");
    emu.config(r#"{"throttle": []}"#);
    assert!(listing(&run).is_empty(), "nothing was made");
    // Nothing in AWS either.
    assert!(!emu.calls().iter().any(|c| c["op"] == "CreateVpc"), "no AWS resource was touched");
}
