//! Snapshot tests of what operators read: `--help`, `plan`, `status` and the failover plan, with
//! IDs, ARNs, addresses and times filtered out. A change to the output shows as a diff here;
//! when it is meant, rerun with `PGDR_UPDATE_SNAPSHOTS=1` and review the new files.

use std::path::PathBuf;
use std::process::Command;

use crate::harness::{Emu, Run};

fn snapshot_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/snapshots").join(format!("{name}.txt"))
}

/// What varies from run to run, replaced by a placeholder.
fn normalize(text: &str) -> String {
    let rules: [(&str, &str); 9] = [
        (r"arn:aws:[A-Za-z0-9:/._\-]+", "<arn>"),
        (r"\b(vpc|subnet|sg|sgr|rtb|rtbassoc|pcx|vpce|eni)-[0-9a-f]{6,}\b", "<${1}-id>"),
        (r"[A-Za-z0-9\-]+\.[a-z0-9]+\.[a-z0-9\-]+\.rds\.amazonaws\.com", "<endpoint>"),
        (r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", "<uuid>"),
        (r"\b[0-9A-Z]{14,32}\b", "<zone-id>"),
        (r"\b[0-9]+\.[0-9]s\b", "<t>"),
        (r"\b[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z\b", "<time>"),
        (r"pending confirmation", "pending confirmation"),
        (r" +\n", "\n"),
    ];
    let mut out = text.to_owned();
    for (pattern, with) in rules {
        out = replace_all(&out, pattern, with);
    }
    out
}

fn replace_all(text: &str, pattern: &str, with: &str) -> String {
    let re = regex_lite::Regex::new(pattern).expect("snapshot filter pattern");
    re.replace_all(text, with).into_owned()
}

/// Compares `actual` (normalized) with the stored snapshot; rewrites it when asked.
fn check(name: &str, actual: &str) {
    let actual = normalize(actual);
    let path = snapshot_path(name);
    if std::env::var("PGDR_UPDATE_SNAPSHOTS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &actual).expect("write snapshot");
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("no snapshot {}: run with PGDR_UPDATE_SNAPSHOTS=1 and review it", path.display()));
    if want != actual {
        let diff: Vec<String> = want
            .lines()
            .zip(actual.lines())
            .enumerate()
            .filter(|(_, (w, a))| w != a)
            .take(10)
            .map(|(i, (w, a))| format!("line {}:\n  want: {w}\n  have: {a}", i + 1))
            .collect();
        panic!(
            "{name} differs from {} ({} vs {} lines):\n{}\n--- actual\n{actual}",
            path.display(),
            want.lines().count(),
            actual.lines().count(),
            diff.join("\n")
        );
    }
}

fn help(args: &[&str]) -> String {
    // No PGDR_* variable of the caller's may show in the help's [env: …] notes.
    let o = Command::new(env!("CARGO_BIN_EXE_pgdr"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .expect("run pgdr");
    assert!(o.status.success(), "{args:?}: {o:?}");
    String::from_utf8_lossy(&o.stdout).into()
}

/// Steps run concurrently and are listed in the order they finished, and a step's concurrent
/// chains record in the order they finish: sort the blocks (a line without indent and what
/// follows it) and the lines in each, so the snapshot holds what was said, not its timing.
fn settled_order(text: &str) -> String {
    let mut head: Vec<String> = Vec::new();
    let mut blocks: Vec<(String, Vec<String>)> = Vec::new();
    let mut tail: Vec<String> = Vec::new();
    for line in text.lines() {
        let indented = line.starts_with("  ");
        if line.starts_with("plan:") || line.starts_with("Nothing to do") || line.starts_with("up:") {
            tail.push(line.to_owned());
        } else if !indented {
            blocks.push((line.to_owned(), Vec::new()));
        } else if let Some(b) = blocks.last_mut() {
            b.1.push(line.to_owned());
        } else {
            head.push(line.to_owned());
        }
    }
    for b in &mut blocks {
        b.1.sort();
    }
    blocks.sort();
    let mut out: Vec<String> = head;
    for (h, lines) in blocks {
        out.push(h);
        out.extend(lines);
    }
    out.extend(tail);
    out.iter().map(|l| format!("{l}\n")).collect()
}

#[test]
fn help_texts() {
    check("help", &help(&["--help"]));
    for cmd in ["plan", "up", "status", "down", "failover", "reprotect", "adopt", "unlock", "state"] {
        check(&format!("help-{cmd}"), &help(&[cmd, "--help"]));
    }
}

#[test]
fn plan_status_and_failover_plan() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    let plan = run.ok(&["plan", "--env", "dev"]);
    check("plan-new-environment", &settled_order(&plan.stdout));
    run.ok(&["up", "--env", "dev"]);
    let plan = run.ok(&["plan", "--env", "dev"]);
    check("plan-no-change", &settled_order(&plan.stdout));
    let status = run.ok(&["status", "--env", "dev"]);
    check("status-healthy", &settled_order(&status.stdout));
    // The failover plan goes to stderr; a dry run's stdout is empty.
    let dry = run.pgdr(&["failover", "--env", "dev", "--dry-run", "--force"]);
    assert_eq!(dry.code, 0, "{dry:?}");
    assert!(dry.stdout.is_empty(), "{dry:?}");
    let plan_text: String = dry.stderr.lines().filter(|l| !l.starts_with('[')).map(|l| format!("{l}\n")).collect();
    check("failover-plan", &plan_text);
}
