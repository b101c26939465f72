//! A job's JSONB `selection` (SPEC §6.1), parsed strictly: unknown keys and
//! wrong types fail the job with a message naming the key.

use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Upper bound of `ids`, so a selection cannot make one statement huge.
pub const MAX_IDS: usize = 100_000;

/// Keys every scope accepts.
#[derive(Debug, Clone)]
pub struct Common {
    pub ids: Option<Vec<i64>>,
    pub id_from: Option<i64>,
    pub id_to: Option<i64>,
    pub created_before: Option<OffsetDateTime>,
    pub created_after: Option<OffsetDateTime>,
    pub limit: Option<i64>,
    pub batch_size: Option<i64>,
    pub max_rate: Option<f64>,
    pub dry_run: bool,
    pub verify: bool,
    pub backup: bool,
    pub max_failures: i64,
    pub allow_experimental: bool,
}

impl Common {
    /// The ids the selection allows at most: `id_from..=id_to`, narrowed to
    /// the smallest and largest of `ids` when those are given.
    pub fn id_window(&self) -> (i64, i64) {
        let mut from = self.id_from.unwrap_or(i64::MIN);
        let mut to = self.id_to.unwrap_or(i64::MAX);
        if let Some(ids) = &self.ids {
            from = from.max(ids.iter().copied().min().unwrap_or(i64::MAX));
            to = to.min(ids.iter().copied().max().unwrap_or(i64::MIN));
        }
        (from, to)
    }
}

/// Keys of the `hashes` scope.
#[derive(Debug, Clone)]
pub struct Hashes {
    pub common: Common,
    pub table: String,
    pub column: String,
    pub version_column: Option<String>,
    pub id_column: Option<String>,
    pub from_version: Option<String>,
}

/// Keys of the `signatures` scope.
#[derive(Debug, Clone)]
pub struct Signatures {
    pub common: Common,
    pub subject_table: Option<String>,
    pub context: Option<String>,
    /// Aliases of the source algorithms (default: every non-PQ one).
    pub from_algos: Option<Vec<String>>,
    pub signing_key_ids: Option<Vec<i64>>,
    /// Countersign sources of a stronger algorithm with a weaker one.
    pub allow_downgrade: bool,
}

/// Keys of the `wrappers` scope.
#[derive(Debug, Clone)]
pub struct Wrappers {
    pub common: Common,
    /// `key_wrappers.status` values to select (default `["active"]`).
    pub status: Vec<String>,
    /// Input formats to select; NULL crypto_suite counts as `legacy-aes-gcm`.
    pub formats: Option<Vec<String>>,
    /// Select wrappers whose kms1_key_id or kms2_key_id is one of these.
    pub kms_key_ids: Option<Vec<i64>>,
    /// Re-wrap `pqmig-wrap-v1` wrappers under a weaker KEM.
    pub allow_downgrade: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("selection.{key}: {reason}")]
pub struct SelectionError {
    pub key: String,
    pub reason: String,
}

fn bad(key: &str, reason: impl Into<String>) -> SelectionError {
    SelectionError {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

const COMMON_KEYS: &[&str] = &[
    "ids",
    "id_from",
    "id_to",
    "created_before",
    "created_after",
    "limit",
    "batch_size",
    "max_rate",
    "dry_run",
    "verify",
    "backup",
    "max_failures",
    "allow_experimental",
];

const WRAPPERS_KEYS: &[&str] = &["status", "formats", "kms_key_ids", "allow_downgrade"];
const SIGNATURES_KEYS: &[&str] = &[
    "subject_table",
    "context",
    "from_algos",
    "signing_key_ids",
    "allow_downgrade",
];

/// The values `key_wrappers.status` and `crypto_suite.format` can take.
const WRAPPER_STATUSES: &[&str] = &["active", "rotated", "retired", "invalid"];
const WRAPPER_FORMATS: &[&str] = &[
    "legacy-aes-gcm",
    "legacy-x25519",
    "legacy-aws-kms",
    "legacy-vault-transit",
    "pqmig-wrap-v1",
];

const HASHES_KEYS: &[&str] = &[
    "table",
    "column",
    "version_column",
    "id_column",
    "from_version",
];

/// Reads typed values out of the selection object, remembering which keys
/// were consumed so leftovers can be reported as unknown.
struct Reader<'a> {
    map: &'a Map<String, Value>,
}

impl<'a> Reader<'a> {
    fn new(
        selection: Option<&'a Value>,
        empty: &'a Map<String, Value>,
    ) -> Result<Self, SelectionError> {
        match selection {
            None | Some(Value::Null) => Ok(Reader { map: empty }),
            Some(Value::Object(map)) => Ok(Reader { map }),
            Some(other) => Err(bad(
                "(root)",
                format!("must be a JSON object, got {}", kind(other)),
            )),
        }
    }

    fn check_keys(&self, allowed: &[&[&str]]) -> Result<(), SelectionError> {
        let mut unknown: Vec<&str> = self
            .map
            .keys()
            .map(String::as_str)
            .filter(|k| !allowed.iter().any(|set| set.contains(k)))
            .collect();
        unknown.sort_unstable();
        match unknown.first() {
            None => Ok(()),
            Some(k) => {
                let mut known: Vec<&str> = allowed.iter().flat_map(|s| s.iter().copied()).collect();
                known.sort_unstable();
                Err(bad(
                    &shown(k),
                    format!("unknown key (known: {})", known.join(", ")),
                ))
            }
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn int(&self, key: &str) -> Result<Option<i64>, SelectionError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| {
                bad(
                    key,
                    format!("expected an integer (64-bit), got {}", kind(v)),
                )
            }),
        }
    }

    fn positive(&self, key: &str, max: i64) -> Result<Option<i64>, SelectionError> {
        match self.int(key)? {
            Some(n) if !(1..=max).contains(&n) => {
                Err(bad(key, format!("{n} is out of range 1..={max}")))
            }
            other => Ok(other),
        }
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool, SelectionError> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(bad(key, format!("expected true or false, got {}", kind(v)))),
        }
    }

    fn text(&self, key: &str) -> Result<Option<String>, SelectionError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Err(bad(key, "must not be empty")),
            Some(Value::String(s)) if s.len() > 1024 => Err(bad(key, "longer than 1024 bytes")),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(bad(key, format!("expected a string, got {}", kind(v)))),
        }
    }

    /// A non-empty array of strings, each one of `allowed` (any when empty).
    fn texts(&self, key: &str, allowed: &[&str]) -> Result<Option<Vec<String>>, SelectionError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) if items.is_empty() => Err(bad(key, "must not be empty")),
            Some(Value::Array(items)) if items.len() > 64 => Err(bad(
                key,
                format!("{} values, at most 64 allowed", items.len()),
            )),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) if s.is_empty() || s.len() > 120 => {
                        Err(bad(&format!("{key}[{i}]"), "must be 1 to 120 bytes"))
                    }
                    Value::String(s) if allowed.is_empty() || allowed.contains(&s.as_str()) => {
                        Ok(s.clone())
                    }
                    Value::String(s) => Err(bad(
                        &format!("{key}[{i}]"),
                        format!("{:?} is not one of {}", truncate(s), allowed.join(", ")),
                    )),
                    v => Err(bad(
                        &format!("{key}[{i}]"),
                        format!("expected a string, got {}", kind(v)),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(bad(
                key,
                format!("expected an array of strings, got {}", kind(v)),
            )),
        }
    }

    fn time(&self, key: &str) -> Result<Option<OffsetDateTime>, SelectionError> {
        match self.text(key)? {
            None => Ok(None),
            Some(s) => OffsetDateTime::parse(&s, &Rfc3339).map(Some).map_err(|e| {
                bad(
                    key,
                    format!("{:?} is not an RFC 3339 time: {e}", truncate(&s)),
                )
            }),
        }
    }

    fn ids(&self, key: &str) -> Result<Option<Vec<i64>>, SelectionError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => {
                if items.len() > MAX_IDS {
                    return Err(bad(
                        key,
                        format!("{} ids, at most {MAX_IDS} allowed", items.len()),
                    ));
                }
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.as_i64().ok_or_else(|| {
                            bad(
                                &format!("{key}[{i}]"),
                                format!("expected an integer, got {}", kind(v)),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some)
            }
            Some(v) => Err(bad(
                key,
                format!("expected an array of integers, got {}", kind(v)),
            )),
        }
    }

    fn common(&self) -> Result<Common, SelectionError> {
        let c = Common {
            ids: self.ids("ids")?,
            id_from: self.int("id_from")?,
            id_to: self.int("id_to")?,
            created_before: self.time("created_before")?,
            created_after: self.time("created_after")?,
            limit: self.positive("limit", i64::MAX)?,
            batch_size: self.positive("batch_size", 10_000)?,
            max_rate: match self.get("max_rate") {
                None => None,
                Some(v) => match v.as_f64() {
                    Some(r) if r > 0.0 && r.is_finite() => Some(r),
                    _ => {
                        return Err(bad(
                            "max_rate",
                            format!(
                                "expected a positive number of items/s, got {}",
                                match v {
                                    Value::Number(n) => n.to_string(),
                                    other => kind(other).to_owned(),
                                }
                            ),
                        ));
                    }
                },
            },
            dry_run: self.bool("dry_run", false)?,
            verify: self.bool("verify", true)?,
            backup: self.bool("backup", true)?,
            max_failures: match self.int("max_failures")? {
                Some(n) if n < 0 => return Err(bad("max_failures", format!("{n} is negative"))),
                Some(n) => n,
                None => 1000,
            },
            allow_experimental: self.bool("allow_experimental", false)?,
        };
        if let (Some(from), Some(to)) = (c.id_from, c.id_to)
            && from > to
        {
            return Err(bad("id_from", format!("{from} is greater than id_to {to}")));
        }
        Ok(c)
    }
}

/// Names the JSON type of a value for error messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer out of range",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A key name from the selection as an error may show it: control, bidi
/// and other invisible characters escaped (`\u{202e}`), so the message stays
/// one clean line whatever the input was, then truncated.
fn shown(s: &str) -> String {
    truncate(&s.escape_debug().to_string())
}

/// Keep hostile keys and values from flooding the error column.
fn truncate(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Parse the selection of a `hashes` job.
pub fn parse_hashes(selection: Option<&Value>) -> Result<Hashes, SelectionError> {
    let empty = Map::new();
    let r = Reader::new(selection, &empty)?;
    r.check_keys(&[COMMON_KEYS, HASHES_KEYS])?;
    Ok(Hashes {
        common: r.common()?,
        table: r
            .text("table")?
            .ok_or_else(|| bad("table", "required for the hashes scope"))?,
        column: r
            .text("column")?
            .ok_or_else(|| bad("column", "required for the hashes scope"))?,
        version_column: r.text("version_column")?,
        id_column: r.text("id_column")?,
        from_version: r.text("from_version")?,
    })
}

/// Parse the selection of a `wrappers` job.
pub fn parse_wrappers(selection: Option<&Value>) -> Result<Wrappers, SelectionError> {
    let empty = Map::new();
    let r = Reader::new(selection, &empty)?;
    r.check_keys(&[COMMON_KEYS, WRAPPERS_KEYS])?;
    Ok(Wrappers {
        common: r.common()?,
        status: r
            .texts("status", WRAPPER_STATUSES)?
            .unwrap_or_else(|| vec!["active".into()]),
        formats: r.texts("formats", WRAPPER_FORMATS)?,
        kms_key_ids: r.ids("kms_key_ids")?,
        allow_downgrade: r.bool("allow_downgrade", false)?,
    })
}

/// Parse the selection of a `signatures` job.
pub fn parse_signatures(selection: Option<&Value>) -> Result<Signatures, SelectionError> {
    let empty = Map::new();
    let r = Reader::new(selection, &empty)?;
    r.check_keys(&[COMMON_KEYS, SIGNATURES_KEYS])?;
    Ok(Signatures {
        common: r.common()?,
        subject_table: r.text("subject_table")?,
        context: match r.get("context") {
            // The empty context is a real value (the column's default).
            Some(Value::String(s)) if s.is_empty() => Some(String::new()),
            _ => r.text("context")?,
        },
        from_algos: r.texts("from_algos", &[])?,
        signing_key_ids: r.ids("signing_key_ids")?,
        allow_downgrade: r.bool("allow_downgrade", false)?,
    })
}
