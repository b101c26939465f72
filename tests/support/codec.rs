//! Byte encodings the tests read and write (test vectors, pyca's JSON).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;

pub fn b64(b: &[u8]) -> String {
    STANDARD.encode(b)
}

/// A base64 JSON string's bytes.
pub fn unb64(v: &Value) -> Vec<u8> {
    STANDARD
        .decode(v.as_str().expect("a base64 string"))
        .expect("base64")
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd-length hex {s:?}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}
