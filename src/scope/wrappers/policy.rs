//! A policy's part of a wrap (SPEC §5.2, §6.2): which of its keys wrap a
//! wrapper (`layer_selection`), and the AAD its template renders for a row.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::crypto::kem::Kem;
use crate::db::wrappers::Policy;

/// The placeholders an `aad_template` string may use (SPEC §5.2).
const PLACEHOLDERS: &[&str] = &[
    "wrapper_id",
    "wrapper_uuid",
    "policy_id",
    "policy_name",
    "wrap_version",
];

/// How the layer keys of a wrapper are chosen (SPEC §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerSelection {
    Defined,
    RoundRobin,
    Random,
    HashMod,
}

impl LayerSelection {
    pub fn parse(s: &str) -> Option<LayerSelection> {
        match s {
            "defined" => Some(LayerSelection::Defined),
            "round_robin" => Some(LayerSelection::RoundRobin),
            "random" => Some(LayerSelection::Random),
            "hash_mod" => Some(LayerSelection::HashMod),
            _ => None,
        }
    }
}

/// Choose which of `count` candidate keys (most preferred first) wrap one
/// wrapper; returns their indexes in layer order.
///
/// - `defined`: the first min(max_layers, count).
/// - `round_robin`: min_layers keys from offset `wrapper_id mod count`.
/// - `hash_mod`: the same, the offset being the first 8 bytes of
///   SHA-256(uuid) as a big-endian integer, mod count.
/// - `random`: min_layers distinct keys drawn with probability
///   proportional to weight (keys of weight ≤ 0 are never drawn).
pub fn choose_layers(
    mode: LayerSelection,
    weights: &[i32],
    min_layers: usize,
    max_layers: usize,
    wrapper_id: i64,
    uuid: &str,
    rng: &mut impl rand::Rng,
) -> Vec<usize> {
    let count = weights.len();
    let rotate = |offset: usize| (0..min_layers).map(|i| (offset + i) % count).collect();
    match mode {
        LayerSelection::Defined => (0..max_layers.min(count)).collect(),
        LayerSelection::RoundRobin => rotate(wrapper_id.rem_euclid(count as i64) as usize),
        LayerSelection::HashMod => {
            let h = Sha256::digest(uuid.as_bytes());
            let n = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
            rotate((n % count as u64) as usize)
        }
        LayerSelection::Random => {
            let mut left: Vec<(usize, u64)> = weights
                .iter()
                .enumerate()
                .filter(|(_, w)| **w > 0)
                .map(|(i, w)| (i, *w as u64))
                .collect();
            let mut out = Vec::with_capacity(min_layers);
            while out.len() < min_layers && !left.is_empty() {
                let total: u64 = left.iter().map(|(_, w)| w).sum();
                let mut pick = rand::RngExt::random_range(rng, 0..total);
                let at = left
                    .iter()
                    .position(|(_, w)| {
                        if pick < *w {
                            true
                        } else {
                            pick -= w;
                            false
                        }
                    })
                    .expect("pick < total");
                out.push(left.remove(at).0);
            }
            out
        }
    }
}

/// One piece of a template string: literal text or a known placeholder.
enum Piece<'a> {
    Text(&'a str),
    Placeholder(&'static str),
}

/// Split a template string into text and placeholders. Every `{` or `}`
/// must belong to a known placeholder, so no implementation can read the
/// template differently (an unknown `{name}`, `{}`, `{a b}` or a lone
/// brace is an error naming it).
fn pieces(s: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(at) = rest.find(['{', '}']) {
        if at > 0 {
            out.push(Piece::Text(&rest[..at]));
        }
        let tail = &rest[at..];
        let known = PLACEHOLDERS.iter().find(|p| {
            tail.strip_prefix('{')
                .and_then(|t| t.strip_prefix(**p))
                .is_some_and(|t| t.starts_with('}'))
        });
        match known {
            Some(p) => {
                out.push(Piece::Placeholder(p));
                rest = &tail[p.len() + 2..];
            }
            None => {
                let shown: String = tail
                    .chars()
                    .take_while(|c| *c != '}')
                    .take(64)
                    .chain(tail.contains('}').then_some('}'))
                    .collect();
                return Err(format!(
                    "unknown placeholder {} (known: {}; a literal brace is not allowed)",
                    shown.escape_debug(),
                    PLACEHOLDERS
                        .iter()
                        .map(|p| format!("{{{p}}}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    Ok(out)
}

/// Check every value of a template: strings with known placeholders only,
/// in objects and arrays. Numbers, booleans and null are refused: the
/// canonical JSON of a number is not the same in every implementation.
fn check_template(v: &Value, path: &str) -> Result<(), String> {
    match v {
        Value::String(s) => pieces(s).map(|_| ()).map_err(|e| format!("{path}: {e}")),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| check_template(item, &format!("{path}[{i}]"))),
        Value::Object(map) => map
            .iter()
            .try_for_each(|(k, item)| check_template(item, &format!("{path}.{k:.64}"))),
        other => Err(format!(
            "{path}: template values must be strings, got {}",
            match other {
                Value::Number(_) => "a number",
                Value::Bool(_) => "a boolean",
                _ => "null",
            }
        )),
    }
}

/// Whether a checked template uses `placeholder` in any string value.
fn uses_placeholder(v: &Value, placeholder: &str) -> bool {
    match v {
        Value::String(s) => pieces(s)
            .unwrap_or_default()
            .iter()
            .any(|p| matches!(p, Piece::Placeholder(q) if *q == placeholder)),
        Value::Array(items) => items.iter().any(|i| uses_placeholder(i, placeholder)),
        Value::Object(map) => map.values().any(|i| uses_placeholder(i, placeholder)),
        _ => false,
    }
}

/// The policy's AAD template, or the default of SPEC §5.2; an unknown
/// placeholder, a stray brace or a non-string value is an error naming it.
pub fn aad_template(policy: &Policy) -> Result<Value, String> {
    let template = template_of(policy)?;
    // What binds a wrap to its row (SPEC §5.2's default has both): without
    // them an older wrap of the same row, copied back, would still open.
    for required in ["wrapper_uuid", "wrap_version"] {
        if !uses_placeholder(&template, required) {
            return Err(format!(
                "policy {:?}: aad_template must use {{{required}}} (it binds each wrap to its row and version)",
                policy.name
            ));
        }
    }
    Ok(template)
}

/// The template as [`aad_template`] checks it, without the placeholders a
/// new wrap needs: what opening an existing wrap renders.
pub(super) fn template_of(policy: &Policy) -> Result<Value, String> {
    let template = match &policy.aad_template {
        None | Some(Value::Null) => {
            json!({"wrapper_uuid": "{wrapper_uuid}", "wrap_version": "{wrap_version}"})
        }
        Some(t @ Value::Object(_)) => t.clone(),
        Some(_) => {
            return Err(format!(
                "policy {:?}: aad_template must be a JSON object",
                policy.name
            ));
        }
    };
    check_template(&template, "aad_template")
        .map_err(|e| format!("policy {:?}: {e}", policy.name))?;
    Ok(template)
}

/// The policy a wrappers job wraps under, as it was when the job first
/// started (kept in `result.policy`): a job never writes under two
/// templates, and a wrap is checked against the template it was made
/// with, even after the policy is renamed, edited or deleted.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PolicyPin {
    pub id: i64,
    pub name: String,
    pub aad_template: Value,
}

impl PolicyPin {
    pub(super) fn policy(&self) -> Policy {
        Policy {
            id: self.id,
            name: self.name.clone(),
            layer_selection: String::new(),
            min_layers: 0,
            max_layers: 0,
            aad_template: Some(self.aad_template.clone()),
        }
    }
}

/// The values of the placeholders for one wrapper.
pub struct AadValues<'a> {
    pub wrapper_id: i64,
    /// Canonical (36 characters, lowercase), see [`wrap::canonical_uuid`].
    pub wrapper_uuid: &'a str,
    pub policy_id: i64,
    pub policy_name: &'a str,
    pub wrap_version: i32,
}

impl AadValues<'_> {
    fn get(&self, placeholder: &str) -> String {
        match placeholder {
            "wrapper_id" => self.wrapper_id.to_string(),
            "wrapper_uuid" => self.wrapper_uuid.to_owned(),
            "policy_id" => self.policy_id.to_string(),
            "policy_name" => self.policy_name.to_owned(),
            "wrap_version" => self.wrap_version.to_string(),
            other => unreachable!("unknown placeholder {other} passed the template check"),
        }
    }
}

/// Substitute the placeholders into every string value of a checked
/// template, in one pass: a value that itself looks like a placeholder
/// (a policy named "{wrapper_uuid}") is inserted as it is.
pub fn render_aad(template: &Value, values: &AadValues<'_>) -> Value {
    match template {
        Value::String(s) => {
            let mut out = String::with_capacity(s.len() + 36);
            for piece in pieces(s).expect("checked by aad_template") {
                match piece {
                    Piece::Text(t) => out.push_str(t),
                    Piece::Placeholder(p) => out.push_str(&values.get(p)),
                }
            }
            Value::String(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(|i| render_aad(i, values)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), render_aad(v, values)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The KEM an algorithm row stands for, if pqmig can wrap with it.
pub fn kem_of(algo: &crate::db::algorithms::Algorithm) -> Option<Kem> {
    if algo.class != "kem" {
        return None;
    }
    match (
        algo.name.to_ascii_uppercase().as_str(),
        algo.variant.as_deref(),
    ) {
        ("ML-KEM", Some("768")) => Some(Kem::MlKem768),
        ("ML-KEM", Some("1024")) => Some(Kem::MlKem1024),
        ("X-WING", None | Some("")) => Some(Kem::XWing),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(template: Value) -> Policy {
        Policy {
            id: 7,
            name: "p".into(),
            layer_selection: "defined".into(),
            min_layers: 1,
            max_layers: 1,
            aad_template: Some(template),
        }
    }

    #[test]
    fn templates_allow_only_known_placeholders_and_strings() {
        for (bad, why) in [
            (json!({"a": "{tenant}"}), "unknown placeholder {tenant}"),
            (json!({"a": "{}"}), "unknown placeholder {}"),
            (
                json!({"a": "{wrapper id}"}),
                "unknown placeholder {wrapper id}",
            ),
            (
                json!({"a": "x{wrapper_id"}),
                "unknown placeholder {wrapper_id",
            ),
            (json!({"a": "x}"}), "unknown placeholder }"),
            (
                json!({"a": {"b": ["{policy_id}", 3]}}),
                "aad_template.a.b[1]: template values must be strings, got a number",
            ),
            (json!({"a": true}), "got a boolean"),
            (json!({"a": null}), "got null"),
        ] {
            let e = aad_template(&policy(bad.clone())).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(
            aad_template(&policy(
                json!({"a": ["{wrapper_id}-{wrap_version}", {"b": "{wrapper_uuid}"}]})
            ))
            .is_ok()
        );
        // what binds a wrap to its row must be there
        for (t, missing) in [
            (json!({"v": "{wrap_version}"}), "{wrapper_uuid}"),
            (
                json!({"u": "{wrapper_uuid}", "p": "{policy_id}"}),
                "{wrap_version}",
            ),
        ] {
            let e = aad_template(&policy(t)).unwrap_err();
            assert!(e.contains(&format!("must use {missing}")), "{e}");
        }
        let default = Policy {
            aad_template: None,
            ..policy(json!({}))
        };
        assert!(aad_template(&default).is_ok());
    }

    #[test]
    fn placeholders_are_substituted_once() {
        let t = aad_template(&policy(
            json!({"n": "{policy_name}|{wrapper_uuid}", "v": "{wrap_version}"}),
        ))
        .unwrap();
        let values = AadValues {
            wrapper_id: 1,
            wrapper_uuid: "0b5b1c1e-4b8e-4c8a-9d4e-2f1c3a5b6d7e",
            policy_id: 7,
            policy_name: "{wrapper_uuid}{wrap_version}",
            wrap_version: 2,
        };
        assert_eq!(
            render_aad(&t, &values),
            json!({"n": "{wrapper_uuid}{wrap_version}|0b5b1c1e-4b8e-4c8a-9d4e-2f1c3a5b6d7e", "v": "2"})
        );
    }
}
