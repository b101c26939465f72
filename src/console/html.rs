//! The pieces every console page is written with: escaping (every string
//! that comes from the database or the host goes through [`esc`]), the
//! page frame, and short human formats.

use std::fmt::{self, Write};

/// `s` with the five characters that matter in HTML text and attribute
/// values replaced by entities.
pub fn escape(s: &str) -> String {
    esc(s).to_string()
}

/// Escapes `s` as it is formatted: `write!(out, "<td>{}</td>", esc(s))`.
pub fn esc(s: &str) -> Escaped<'_> {
    Escaped(s)
}

pub struct Escaped<'a>(&'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..i])?;
            f.write_str(match rest.as_bytes()[i] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[i + 1..];
        }
        f.write_str(rest)
    }
}

/// At most `max` characters of `s`, with `…` when cut (before escaping,
/// so an entity is never cut in half).
pub fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

pub use crate::short_duration as duration;

/// `1234567` → `1 234 567` (thin spaces keep columns readable).
pub fn count(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() * 4 / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{202f}');
        }
        out.push(d);
    }
    out
}

/// Where the page sits in the console, for the navigation line.
pub enum Nav<'a> {
    Overview,
    Job(i64),
    Other(&'a str),
}

/// The page around `body`: stylesheet and script are the console's own
/// routes (the CSP allows nothing else), and the body alone is what the
/// script swaps on refresh.
pub fn frame(title: &str, nav: Nav<'_>, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 1024);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\" data-refresh=\"{}\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · pqmig</title>\
         <link rel=\"stylesheet\" href=\"/console/console.css\">\
         <script src=\"/console/console.js\" defer></script></head>\n<body>\
         <header><a class=\"brand\" href=\"/console\">pqmig</a> <nav>",
        super::REFRESH_SECONDS,
        esc(title)
    );
    match nav {
        Nav::Overview => out.push_str("<span>jobs · inventory</span>"),
        Nav::Job(id) => {
            let _ = write!(out, "<a href=\"/console\">jobs</a> › <span>job {id}</span>");
        }
        Nav::Other(what) => {
            let _ = write!(
                out,
                "<a href=\"/console\">jobs</a> › <span>{}</span>",
                esc(what)
            );
        }
    }
    out.push_str("</nav></header>\n<main>");
    out.push_str(body);
    let _ = write!(
        out,
        "</main>\n<footer>pqmig {} · read-only · \
         <span class=\"js-only\">refreshes every {} s</span>\
         <noscript>reload the page to refresh</noscript></footer>\n</body></html>\n",
        env!("CARGO_PKG_VERSION"),
        super::REFRESH_SECONDS
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_replaces_every_special_character() {
        assert_eq!(
            escape(r#"<a href="x" title='y'>&amp;</a>"#),
            "&lt;a href=&quot;x&quot; title=&#39;y&#39;&gt;&amp;amp;&lt;/a&gt;"
        );
        assert_eq!(escape("plain text, ü ✓"), "plain text, ü ✓");
        assert_eq!(escape(""), "");
        assert_eq!(escape("<<>>"), "&lt;&lt;&gt;&gt;");
        assert_eq!(
            format!("<td>{}</td>", esc("<script>alert(1)</script>")),
            "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>"
        );
    }

    #[test]
    fn clip_cuts_on_characters_not_bytes() {
        assert_eq!(clip("ééééé", 3), "ééé…");
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(escape(&clip("<<<<", 2)), "&lt;&lt;…");
    }

    #[test]
    fn counts_and_durations_read_short() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_234_567), "1\u{202f}234\u{202f}567");
        assert_eq!(count(-1000), "-1\u{202f}000");
        assert_eq!(duration(59.4), "59s");
        assert_eq!(duration(90.0), "1m30s");
        assert_eq!(duration(7_200.0), "2h00m");
    }
}
