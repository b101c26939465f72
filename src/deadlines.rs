//! NIST IR 8547 (initial public draft, November 2024), "Transition to
//! Post-Quantum Cryptography Standards": when each algorithm the inventory
//! counts stops being acceptable. Tables 2 (digital signatures) and 4 (key
//! establishment): quantum-vulnerable algorithms at 112 bits of security
//! are deprecated after 2030 and disallowed after 2035; at 128 bits or
//! more, disallowed after 2035. Post-quantum algorithms, and symmetric
//! ciphers, hashes and MACs, get no quantum transition date there.

use serde::Serialize;
use time::{Date, Month};

/// The source README and every output name.
pub const SOURCE: &str = "NIST IR 8547 ipd (Nov 2024), Tables 2 and 4";

/// What IR 8547 says of an algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "transition", rename_all = "kebab-case")]
pub enum Transition {
    /// Quantum-vulnerable: deprecated after the end of `deprecated_after`
    /// (112-bit security only), disallowed after the end of
    /// `disallowed_after`.
    Deadline {
        deprecated_after: Option<i32>,
        disallowed_after: i32,
    },
    /// Post-quantum, or symmetric / hash / MAC: no quantum transition date.
    None,
    /// An algorithm this table does not know (a host's own alias,
    /// `unknown`, `backup`).
    Unknown,
}

/// Where an algorithm stands on a date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Standing {
    Acceptable,
    Deprecated,
    Disallowed,
    Unknown,
}

/// IR 8547's transition of the inventory's algorithm `label` (the
/// `crypto_standard_aliases` names pqmig seeds, matched without case).
pub fn transition(label: &str) -> Transition {
    let l = label.to_ascii_uppercase();
    let pq = ["ML-KEM-", "ML-DSA-", "SLH-DSA-", "X-WING"];
    let symmetric = ["AES-", "SHA-", "SHA3-", "HMAC-"];
    if pq.iter().chain(&symmetric).any(|p| l.starts_with(p)) {
        return Transition::None;
    }
    let after_2035 = Transition::Deadline {
        deprecated_after: None,
        disallowed_after: 2035,
    };
    let bits_112 = Transition::Deadline {
        deprecated_after: Some(2030),
        disallowed_after: 2035,
    };
    match l.as_str() {
        // 128-bit curves: Ed25519, X25519 (ECDH), ECDSA and ECDH on P-256 and up.
        "ED25519" | "ED448" | "X25519" | "X448" => after_2035,
        _ if l.starts_with("ECDSA-P") || l.starts_with("ECDH-P") => {
            match l.trim_start_matches("ECDSA-P").trim_start_matches("ECDH-P") {
                "224" => bits_112,
                "256" | "384" | "521" => after_2035,
                _ => Transition::Unknown,
            }
        }
        // RSA and finite-field DH: 2048-bit moduli give 112 bits, 3072 and up 128.
        _ if l.starts_with("RSA-") || l.starts_with("DH-") || l.starts_with("FFDH-") => {
            match l.rsplit('-').next().and_then(|n| n.parse::<u32>().ok()) {
                Some(2048) => bits_112,
                Some(n) if n >= 3072 => after_2035,
                _ => Transition::Unknown,
            }
        }
        _ => Transition::Unknown,
    }
}

impl Transition {
    /// Where the algorithm stands on `date`.
    pub fn standing(&self, date: Date) -> Standing {
        match *self {
            Transition::None => Standing::Acceptable,
            Transition::Unknown => Standing::Unknown,
            Transition::Deadline {
                deprecated_after,
                disallowed_after,
            } => {
                if date.year() > disallowed_after {
                    Standing::Disallowed
                } else if deprecated_after.is_some_and(|y| date.year() > y) {
                    Standing::Deprecated
                } else {
                    Standing::Acceptable
                }
            }
        }
    }

    /// Sorts by the first date the algorithm stops being acceptable,
    /// those without one last.
    pub fn order(&self) -> (u8, i32) {
        match *self {
            Transition::Deadline {
                deprecated_after,
                disallowed_after,
            } => (0, deprecated_after.unwrap_or(disallowed_after)),
            Transition::Unknown => (1, 0),
            Transition::None => (2, 0),
        }
    }

    /// "deprecated after 2030, disallowed after 2035", for the text report.
    pub fn describe(&self) -> String {
        match *self {
            Transition::Deadline {
                deprecated_after: Some(d),
                disallowed_after,
            } => format!("deprecated after {d}, disallowed after {disallowed_after}"),
            Transition::Deadline {
                deprecated_after: None,
                disallowed_after,
            } => format!("disallowed after {disallowed_after}"),
            Transition::None => "no IR 8547 deadline".into(),
            Transition::Unknown => "deadline unknown".into(),
        }
    }
}

/// `--as-of`: a calendar date, `YYYY-MM-DD`.
pub fn parse_date(s: &str) -> Result<Date, String> {
    let bad = || format!("--as-of: {s:?} is not a date (YYYY-MM-DD)");
    let mut parts = s.splitn(3, '-');
    let mut next = || parts.next().and_then(|p| p.parse::<i64>().ok());
    let (y, m, d) = (
        next().ok_or_else(bad)?,
        next().ok_or_else(bad)?,
        next().ok_or_else(bad)?,
    );
    if s.len() != 10 {
        return Err(bad());
    }
    let month = Month::try_from(u8::try_from(m).map_err(|_| bad())?).map_err(|_| bad())?;
    Date::from_calendar_date(
        i32::try_from(y).map_err(|_| bad())?,
        month,
        u8::try_from(d).map_err(|_| bad())?,
    )
    .map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(s: &str) -> Date {
        parse_date(s).expect("date")
    }

    #[test]
    fn the_tables_of_ir_8547() {
        let ed = transition("Ed25519");
        assert_eq!(ed.describe(), "disallowed after 2035");
        assert_eq!(ed.standing(date("2035-12-31")), Standing::Acceptable);
        assert_eq!(ed.standing(date("2036-01-01")), Standing::Disallowed);
        let rsa = transition("RSA-2048");
        assert_eq!(rsa.standing(date("2030-12-31")), Standing::Acceptable);
        assert_eq!(rsa.standing(date("2031-01-01")), Standing::Deprecated);
        assert_eq!(rsa.standing(date("2036-01-01")), Standing::Disallowed);
        assert_eq!(transition("ecdsa-p256"), transition("X25519"));
        assert_eq!(transition("RSA-4096"), ed);
        for none in [
            "ML-KEM-768",
            "X-Wing",
            "SLH-DSA-SHA2-128s",
            "AES-256-GCM",
            "HMAC-SHA3-256",
        ] {
            assert_eq!(transition(none), Transition::None, "{none}");
        }
        for unknown in ["unknown", "backup", "RSA-1024", "ECDSA-P192", "my-own"] {
            assert_eq!(transition(unknown), Transition::Unknown, "{unknown}");
        }
        assert!(rsa.order() < ed.order() && ed.order() < transition("x").order());
        assert!(transition("x").order() < transition("ML-DSA-65").order());
    }

    #[test]
    fn as_of_dates_are_checked() {
        assert_eq!(date("2031-01-01").year(), 2031);
        for bad in [
            "2031-1-1",
            "2031-02-30",
            "tomorrow",
            "",
            "2031-01-01T00:00:00Z",
        ] {
            let e = parse_date(bad).expect_err(bad);
            assert!(e.starts_with("--as-of: "), "{e}");
        }
    }
}
