//! Test support: a private emulator (moto behind the project's proxy) per test, the pgdr
//! binary run against it, and SDK clients to check what it made.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One emulator: moto_server behind `scripts/emuproxy.py`, killed on drop.
pub struct Emu {
    child: Child,
    pub endpoint: String,
    port: u16,
}

impl Emu {
    pub fn start() -> Emu {
        let venv = std::env::var("PGDR_VENV").map(PathBuf::from).unwrap_or_else(|_| repo().join(".venv"));
        let moto = venv.join("bin/moto_server");
        assert!(moto.exists(), "{} is missing: run scripts/setup-venv (scripts/test does)", moto.display());
        let mut child = Command::new(venv.join("bin/python3"))
            .arg(repo().join("scripts/emuproxy.py"))
            .arg("--moto-bin")
            .arg(&moto)
            .arg("--port")
            .arg("0")
            .arg("--exit-with-parent")
            // The emulator answers as AWS does (scripts/awsrules.py, every rule on); a rule can be
            // switched off for one run with PGDR_RULES_OFF=name,name to tell a product defect
            // from an emulator one.
            .arg("--rules-off")
            .arg(std::env::var("PGDR_RULES_OFF").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start emuproxy.py");
        let stdout = child.stdout.take().expect("proxy stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read the proxy's endpoint");
        let endpoint =
            line.trim().strip_prefix("PGDR_EMULATOR_ENDPOINT=").unwrap_or_else(|| panic!("unexpected proxy output {line:?}")).to_owned();
        let port = endpoint.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
        Emu { child, endpoint, port }
    }

    fn http(&self, method: &str, path: &str, body: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect proxy");
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
    }

    /// Calls recorded by the proxy since the last reset.
    pub fn calls(&self) -> Vec<Value> {
        serde_json::from_str(&self.http("GET", "/__proxy/calls", "")).expect("calls json")
    }

    pub fn reset_calls(&self) {
        self.http("POST", "/__proxy/calls/reset", "{}");
    }

    /// How many round trips deep the recorded calls were: the longest chain of calls each sent
    /// after the previous one's answer had come back (the proxy's `t` and `t_end`).
    pub fn depth(&self) -> usize {
        let mut calls: Vec<(f64, f64)> =
            self.calls().iter().map(|c| (c["t"].as_f64().expect("t"), c["t_end"].as_f64().expect("t_end"))).collect();
        calls.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut best = vec![1usize; calls.len()];
        for i in 0..calls.len() {
            for j in 0..i {
                if calls[i].0 >= calls[j].1 {
                    best[i] = best[i].max(best[j] + 1);
                }
            }
        }
        best.into_iter().max().unwrap_or(0)
    }

    pub fn mutating_calls(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c["mutating"].as_bool().unwrap_or(true))
            .map(|c| {
                format!(
                    "{} {} {}",
                    c["service"].as_str().unwrap_or("?"),
                    c["region"].as_str().unwrap_or("?"),
                    c["op"].as_str().unwrap_or("?")
                )
            })
            .collect()
    }

    pub fn config(&self, json: &str) {
        let out = self.http("POST", "/__proxy/config", json);
        assert!(!out.contains("error"), "proxy config refused: {out}");
    }

    pub fn rds_status(&self, json: &str) {
        self.http("POST", "/__proxy/rds_status", json);
    }

    pub async fn sdk(&self, region: &str) -> aws_types::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_types::region::Region::new(region.to_owned()))
            .endpoint_url(&self.endpoint)
            .credentials_provider(aws_credential_types::Credentials::new("test", "test", None, None, "tests"))
            .load()
            .await
    }
}

impl Drop for Emu {
    fn drop(&mut self) {
        // SIGTERM lets the proxy stop its moto child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// A working directory with its own state directory, and the pgdr binary run in it.
pub struct Run {
    pub dir: tempfile::TempDir,
    pub endpoint: String,
}

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}\n--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

impl Run {
    pub fn new(emu: &Emu) -> Run {
        Run { dir: tempfile::tempdir().expect("tempdir"), endpoint: emu.endpoint.clone() }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join(".pgdr")
    }

    pub fn state_file(&self, env: &str) -> PathBuf {
        self.state_dir().join(format!("{env}.json"))
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write file");
        p
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pgdr"));
        c.args(args)
            .current_dir(self.dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::null());
        c
    }

    pub fn pgdr(&self, args: &[&str]) -> Out {
        let o: Output = self.cmd(args).output().expect("run pgdr");
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into(),
            stderr: String::from_utf8_lossy(&o.stderr).into(),
        }
    }

    /// Runs pgdr, killing it after `secs` (a hang is a failure, not a stuck test run).
    pub fn pgdr_within(&self, args: &[&str], secs: u64) -> Out {
        let mut child = self.cmd(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run pgdr");
        let pid = child.id() as i32;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&done);
        let watchdog = std::thread::spawn(move || {
            let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
            while std::time::Instant::now() < end {
                if flag.load(std::sync::atomic::Ordering::SeqCst) {
                    return false;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            true
        });
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_string(&mut stdout);
        }
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let status = child.wait().expect("wait pgdr");
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let killed = watchdog.join().unwrap_or(false);
        assert!(!killed, "pgdr {args:?} hung for {secs} s:\n{stderr}");
        Out { code: status.code().unwrap_or(-1), stdout, stderr }
    }

    pub fn ok(&self, args: &[&str]) -> Out {
        let o = self.pgdr(args);
        assert_eq!(o.code, 0, "pgdr {args:?} failed: {o:?}");
        o
    }
}

pub fn read_bytes(p: &Path) -> Option<Vec<u8>> {
    std::fs::read(p).ok()
}

/// Tag value of an EC2 resource.
pub fn ec2_tag(tags: &[aws_sdk_ec2::types::Tag], key: &str) -> Option<String> {
    tags.iter().find(|t| t.key() == Some(key)).and_then(|t| t.value().map(str::to_owned))
}
