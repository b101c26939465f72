//! SLH-DSA signatures pinned by an independent source: NIST ACVP sigGen and
//! sigVer vectors (FIPS 205, external interface, pure, with a context) for
//! the two parameter sets pqmig signs with. See `source` in the vector file
//! for the tgIds / tcIds and where they were taken from.

use serde_json::Value;

use pqmig::crypto::sig::{self, SigAlg};

const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/slh_dsa_sig.json"
);

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn cases(kind: &str) -> Vec<Value> {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(VECTORS).unwrap()).unwrap();
    assert!(doc["source"].as_str().unwrap().contains("ACVP"));
    doc[kind].as_array().unwrap().clone()
}

fn alg(t: &Value) -> SigAlg {
    SigAlg::from_alias(t["parameterSet"].as_str().unwrap()).unwrap()
}

fn hex(t: &Value, k: &str) -> Vec<u8> {
    unhex(
        t[k].as_str()
            .unwrap_or_else(|| panic!("{k} in tcId {}", t["tcId"])),
    )
}

/// One sigGen case: pqmig's signature equals NIST's byte for byte (with
/// NIST's additionalRandomness as opt_rand, or none when deterministic) and
/// verifies under the vector's public key.
fn sig_gen(t: &Value) {
    let (alg, tc) = (alg(t), &t["tcId"]);
    let (sk, pk, msg, ctx) = (
        hex(t, "sk"),
        hex(t, "pk"),
        hex(t, "message"),
        hex(t, "context"),
    );
    assert!(!ctx.is_empty(), "tcId {tc}: a context is what these pin");
    let rand = t
        .get("additionalRandomness")
        .map(|_| hex(t, "additionalRandomness"));
    assert_eq!(
        t["deterministic"].as_bool().unwrap(),
        rand.is_none(),
        "tcId {tc}"
    );
    let expected = hex(t, "signature");
    let got = sig::slh_sign_with(alg, &sk, &msg, &ctx, rand.as_deref()).unwrap();
    assert!(
        got == expected,
        "tcId {tc}: signature differs from NIST's (first difference at byte {:?})",
        got.iter().zip(&expected).position(|(a, b)| a != b)
    );
    assert!(sig::verify(alg, &pk, &msg, &ctx, &got), "tcId {tc}");
    assert!(
        !sig::verify(alg, &pk, &msg, b"", &got),
        "tcId {tc}: empty context"
    );
}

fn sig_gen_set(alg: SigAlg) {
    let tests: Vec<Value> = cases("sigGen")
        .into_iter()
        .filter(|t| self::alg(t) == alg)
        .collect();
    // One deterministic and one with additionalRandomness.
    assert_eq!(tests.len(), 2);
    assert!(tests.iter().any(|t| t["deterministic"] == true));
    assert!(tests.iter().any(|t| t["deterministic"] == false));
    for t in &tests {
        sig_gen(t);
    }
}

#[test]
fn slh_dsa_sha2_128f_signs_like_the_acvp_sig_gen_vectors() {
    sig_gen_set(SigAlg::SlhDsaSha2_128f);
}

/// Seconds per signature in a debug build, like the keygen test's 128s.
#[test]
fn slh_dsa_sha2_128s_signs_like_the_acvp_sig_gen_vectors() {
    sig_gen_set(SigAlg::SlhDsaSha2_128s);
}

#[test]
fn slh_dsa_verifies_exactly_as_the_acvp_sig_ver_vectors_say() {
    let tests = cases("sigVer");
    assert_eq!(tests.len(), 6);
    for alg in [SigAlg::SlhDsaSha2_128s, SigAlg::SlhDsaSha2_128f] {
        let of: Vec<&Value> = tests.iter().filter(|t| self::alg(t) == alg).collect();
        assert!(of.iter().any(|t| t["testPassed"] == true), "{alg:?}");
        assert!(of.iter().any(|t| t["testPassed"] == false), "{alg:?}");
    }
    for t in &tests {
        let passed = t["testPassed"].as_bool().unwrap();
        let got = sig::verify(
            alg(t),
            &hex(t, "pk"),
            &hex(t, "message"),
            &hex(t, "context"),
            &hex(t, "signature"),
        );
        assert_eq!(got, passed, "tcId {} ({})", t["tcId"], t["reason"]);
    }
}

#[test]
fn slh_sign_with_refuses_what_it_cannot_sign() {
    let t = &cases("sigGen")[0];
    let (alg, sk) = (alg(t), hex(t, "sk"));
    assert!(sig::slh_sign_with(alg, &sk, b"m", &[0u8; 256], None).is_err());
    assert!(sig::slh_sign_with(alg, &sk, b"m", b"c", Some(&[0u8; 15])).is_err());
    assert!(sig::slh_sign_with(alg, &sk[1..], b"m", b"c", None).is_err());
    assert!(sig::slh_sign_with(SigAlg::MlDsa65, &sk, b"m", b"c", None).is_err());
}
