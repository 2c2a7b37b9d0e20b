//! The CA key encrypted at rest, with the real `mesh-control`: the key file holds no
//! key in clear, a start without the key-encryption key (or with a wrong one) fails
//! naming what to pass, rotation to a new key keeps the same root, and afterwards the
//! old key alone no longer opens it. Needs no root.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use base64::Engine;
use serde_json::Value;

/// A base64 key-encryption key of 32 `byte`s in `dir`; returns its path.
fn kek(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, base64::engine::general_purpose::STANDARD.encode([byte; 32])).unwrap();
    path
}

/// How a start of `mesh-control` ended.
#[derive(Debug)]
enum Start {
    /// It logged "CA ready" (and was then stopped).
    Ready,
    /// It exited before that, with this stderr.
    Failed(String),
}

/// Starts `mesh-control` on loopback with its CA in `ca_dir`, the given extra flags
/// and environment, until its CA is ready (then stops it) or it exits.
fn start(ca_dir: &Path, extra: &[&str], env: &[(&str, String)]) -> Start {
    let tokens = ca_dir.with_extension("tokens");
    std::fs::write(&tokens, "tok node-a\n").unwrap();
    let registry = ca_dir.with_extension("registry.yaml");
    std::fs::write(&registry, "services: []\n").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh-control"));
    cmd.arg("--ca-dir")
        .arg(ca_dir)
        .arg("--bootstrap-tokens")
        .arg(&tokens)
        .arg("--registry")
        .arg(&registry)
        .args(["--listen", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--log-format", "json"])
        .args(extra)
        .env_remove("MESH_KUBERNETES")
        .env_remove("MESH_CA_KEY_ENCRYPTION_KEY")
        .env_remove("MESH_CA_KEY_ENCRYPTION_KEY_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn mesh-control");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if serde_json::from_str::<Value>(&line).is_ok_and(|v| v["message"] == "CA ready") {
                let _ = tx.send(());
            }
        }
    });
    // Ready, or the reader ends because the process exited.
    let ready = rx.recv_timeout(Duration::from_secs(30)).is_ok();
    if ready {
        let _ = child.kill();
        let _ = child.wait();
        return Start::Ready;
    }
    let out = child.wait_with_output().expect("mesh-control ends");
    assert!(!out.status.success(), "mesh-control exited successfully without its CA ready");
    Start::Failed(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn ready(s: Start) {
    if let Start::Failed(stderr) = s {
        panic!("the control plane did not start: {stderr}");
    }
}

fn failed(s: Start) -> String {
    match s {
        Start::Failed(stderr) => stderr,
        Start::Ready => panic!("the control plane started"),
    }
}

#[test]
fn the_ca_key_is_sealed_at_rest_and_its_encryption_key_rotates() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let (k1, k2) = (kek(tmp.path(), "k1", 1), kek(tmp.path(), "k2", 2));
    let flag = |k: &Path| ["--ca-key-encryption-key-file".to_owned(), k.display().to_string()];
    let run = |args: Vec<String>, env: &[(&str, String)]| {
        start(&ca, &args.iter().map(String::as_str).collect::<Vec<_>>(), env)
    };

    // First start: a new root, its key sealed under k1.
    ready(run(flag(&k1).to_vec(), &[]));
    let key_file = std::fs::read_to_string(ca.join("ca-key.pem")).unwrap();
    assert!(key_file.contains("MESH SEALED CA KEY"), "{key_file}");
    assert!(!key_file.contains("PRIVATE KEY"), "the key is in clear: {key_file}");
    let root = std::fs::read_to_string(ca.join("ca.pem")).unwrap();

    // Without a key, or with the wrong one: refused, saying what to pass.
    let none = failed(run(vec![], &[]));
    assert!(none.contains("encrypted") && none.contains("MESH_CA_KEY_ENCRYPTION_KEY"), "{none}");
    let wrong = failed(run(flag(&k2).to_vec(), &[]));
    assert!(wrong.contains("neither the current key-encryption key nor a previous one"), "{wrong}");
    let bad = kek(tmp.path(), "short", 3);
    std::fs::write(&bad, "c2hvcnQ=").unwrap();
    let short = failed(run(flag(&bad).to_vec(), &[]));
    assert!(short.contains("--ca-key-encryption-key-file") && short.contains("32 bytes"), "{short}");

    // Rotation: k2 current, k1 previous: the same root, now sealed under k2.
    let mut rotate = flag(&k2).to_vec();
    rotate.extend(["--ca-key-previous-encryption-key-file".to_owned(), k1.display().to_string()]);
    ready(run(rotate, &[]));
    assert_eq!(std::fs::read_to_string(ca.join("ca.pem")).unwrap(), root, "rotation changed the root");
    assert_ne!(std::fs::read_to_string(ca.join("ca-key.pem")).unwrap(), key_file, "not sealed again");
    let old_only = failed(run(flag(&k1).to_vec(), &[]));
    assert!(old_only.contains("neither the current"), "{old_only}");

    // The key itself in the environment opens it as well.
    let k2_text = std::fs::read_to_string(&k2).unwrap();
    ready(run(vec![], &[("MESH_CA_KEY_ENCRYPTION_KEY", k2_text)]));
    assert_eq!(std::fs::read_to_string(ca.join("ca.pem")).unwrap(), root);
}
