//! Bad input: one clear line, the right exit code, the state file untouched.

use crate::harness::{read_bytes, Emu, Run};

fn one_line(err: &str) -> bool {
    err.trim_end().lines().count() == 1
}

#[test]
fn bad_inputs_exit_1_with_one_line_and_leave_state_untouched() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    std::fs::create_dir_all(run.state_dir()).unwrap();
    let valid = br#"{"schema": 1, "env": "dev", "resources": {}}"#;
    let lock = r#"{"who":"alice","pid":1,"host":"bastion-7","command":"pgdr up","since":"2026-11-22T00:00:00Z"}"#.to_owned();

    struct Case {
        name: &'static str,
        args: Vec<&'static str>,
        state: Option<&'static [u8]>,
        config: Option<&'static str>,
        lock: bool,
        expect: &'static str,
        code: i32,
    }
    #[rustfmt::skip] // One case a line: a table.
    let cases = vec![
        Case { name: "bad env name", args: vec!["up", "--env", "Dev_1"], state: None, config: None, lock: false, expect: "invalid environment name", code: 1 },
        Case { name: "env name too long", args: vec!["up", "--env", "abcdefghijklmnopqrstuv"], state: None, config: None, lock: false, expect: "invalid environment name", code: 1 },
        Case { name: "overlapping CIDRs", args: vec!["up", "--env", "dev"], state: Some(valid), config: Some("[env.dev]\ndr_cidr = \"10.0.128.0/17\"\n"), lock: false, expect: "overlap", code: 1 },
        Case { name: "equal regions", args: vec!["up", "--env", "dev", "--dr-region", "us-east-1"], state: Some(valid), config: None, lock: false, expect: "two different regions", code: 1 },
        Case { name: "unknown region", args: vec!["plan", "--env", "dev", "--dr-region", "mars-north-1"], state: Some(valid), config: None, lock: false, expect: "not a known AWS region", code: 1 },
        Case { name: "region of another partition", args: vec!["plan", "--env", "dev", "--dr-region", "cn-north-1"], state: Some(valid), config: None, lock: false, expect: "aws-cn partition", code: 1 },
        Case { name: "malformed config", args: vec!["up", "--env", "dev"], state: Some(valid), config: Some("[env.dev\nprimary_region = "), lock: false, expect: "config file", code: 1 },
        Case { name: "corrupt state", args: vec!["up", "--env", "dev"], state: Some(b"{\"schema\": 1, \"env\": \"dev\", \"reso"), config: None, lock: false, expect: "corrupt", code: 1 },
        Case { name: "newer state", args: vec!["down", "--env", "dev", "--yes"], state: Some(br#"{"schema": 7, "env": "dev"}"#), config: None, lock: false, expect: "newer", code: 1 },
        Case { name: "held lock", args: vec!["up", "--env", "dev"], state: Some(valid), config: None, lock: true, expect: "locked by alice", code: 1 },
        Case { name: "down without --yes", args: vec!["down", "--env", "dev"], state: Some(valid), config: None, lock: false, expect: "--yes", code: 1 },
    ];
    for c in cases {
        let cfg = run.dir.path().join("case.toml");
        let _ = std::fs::remove_file(&cfg);
        let _ = std::fs::remove_file(run.state_dir().join("dev.lock"));
        let mut args: Vec<&str> = c.args.clone();
        if let Some(text) = c.config {
            std::fs::write(&cfg, text).unwrap();
            args.push("--config");
            args.push(cfg.to_str().unwrap());
        }
        match c.state {
            Some(bytes) => std::fs::write(run.state_file("dev"), bytes).unwrap(),
            None => {
                let _ = std::fs::remove_file(run.state_file("dev"));
            }
        }
        if c.lock {
            std::fs::write(run.state_dir().join("dev.lock"), &lock).unwrap();
        }
        let before = read_bytes(&run.state_file("dev"));
        emu.reset_calls();
        let out = run.pgdr(&args);
        assert_eq!(out.code, c.code, "{}: {out:?}", c.name);
        assert!(out.stderr.contains(c.expect), "{}: {out:?}", c.name);
        assert!(one_line(&out.stderr), "{}: more than one line: {out:?}", c.name);
        assert_eq!(read_bytes(&run.state_file("dev")), before, "{}: state file changed", c.name);
        assert_eq!(emu.mutating_calls(), Vec::<String>::new(), "{}: mutated AWS", c.name);
        // JSON mode reports the same error as JSON on stdout.
        let mut json_args = args.clone();
        json_args.extend(["--output", "json"]);
        let out = run.pgdr(&json_args);
        assert_eq!(out.code, c.code, "{} (json): {out:?}", c.name);
        if !c.args.contains(&"--env") || c.name != "bad env name" {
            assert!(out.json()["error"]["message"].as_str().unwrap().contains(c.expect), "{} (json): {out:?}", c.name);
        }
    }
}

#[test]
fn missing_credentials_and_unreachable_endpoint() {
    let run = Run { dir: tempfile::tempdir().unwrap(), endpoint: "http://127.0.0.1:9".into() };
    let out = run.cmd(&["plan", "--env", "dev"]).env_remove("AWS_ACCESS_KEY_ID").env_remove("AWS_SECRET_ACCESS_KEY").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no AWS credentials"), "{err}");
    assert!(one_line(&err), "{err}");

    // One line naming the endpoint and the fix, before any step starts.
    let out = run.pgdr(&["plan", "--env", "dev"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("cannot reach AWS at http://127.0.0.1:9") && out.stderr.contains("AWS_ENDPOINT_URL"), "{out:?}");
    assert!(one_line(&out.stderr), "{out:?}");
}
