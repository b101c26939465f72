//! The independent implementation the crypto checks run: pyca/cryptography
//! (OpenSSL) in the venv `.ci/setup` makes, driving the scripts in
//! `tests/vectors/` with JSON on stdin and stdout.

use std::io::Write;
use std::process::{Command, Stdio};

const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");

/// The checker script `tests/vectors/<script>`.
pub fn script(name: &str) -> String {
    format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Run `script args` with `stdin`; its stdout, or a panic with its stderr.
pub fn run(script_name: &str, args: &[&str], stdin: &str) -> String {
    let out = output(script_name, args, stdin);
    assert!(
        out.status.success(),
        "{script_name} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Whether `script args` with `stdin` succeeds (for checks that must fail).
pub fn succeeds(script_name: &str, args: &[&str], stdin: &str) -> bool {
    output(script_name, args, stdin).status.success()
}

fn output(script_name: &str, args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(PYTHON)
        .arg(script(script_name))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run .venv/bin/python (bash .ci/setup makes it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("python")
}
