//! The exposure inventory's history as an inline SVG line chart, drawn on
//! the server from the sampler's snapshots (no script, no external asset).

use std::fmt::Write;

use super::html::{count, esc};
use crate::db::inventory::HistoryPoint;

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 220.0;
/// Room for the y labels on the left and the x labels below.
const LEFT: f64 = 64.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 28.0;

/// One line per scope (items still exposed, backups included) over the
/// kept snapshots; every point has a tooltip with its time and value.
pub fn history(points: &[HistoryPoint]) -> String {
    let mut out = String::new();
    if points.is_empty() {
        out.push_str("<p class=\"muted\">No history yet: the inventory is counted once per <code>inventory.interval</code>.</p>");
        return out;
    }
    let scopes = scopes(points);
    let max = points
        .iter()
        .flat_map(|p| p.exposed.iter().map(|(_, n)| *n))
        .max()
        .unwrap_or(0)
        .max(1);
    let (t0, t1) = (
        points[0].sampled_at_unix,
        points[points.len() - 1].sampled_at_unix,
    );
    let x = |t: f64| {
        if t1 > t0 {
            LEFT + (t - t0) / (t1 - t0) * (WIDTH - LEFT - RIGHT)
        } else {
            (LEFT + WIDTH - RIGHT) / 2.0
        }
    };
    let y = |n: i64| TOP + (1.0 - n as f64 / max as f64) * (HEIGHT - TOP - BOTTOM);
    let _ = write!(
        out,
        "<svg class=\"chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" \
         aria-labelledby=\"chart-title\">\
         <title id=\"chart-title\">Items still exposed, by scope, over the last {} snapshots</title>",
        points.len()
    );
    for frac in [0.0, 0.5, 1.0] {
        let n = (max as f64 * frac).round() as i64;
        let yy = y(n);
        let _ = write!(
            out,
            "<line class=\"grid\" x1=\"{LEFT}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\"/>\
             <text class=\"axis\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - RIGHT,
            LEFT - 6.0,
            yy + 4.0,
            count(n)
        );
    }
    let base = HEIGHT - BOTTOM + 18.0;
    let _ = write!(
        out,
        "<text class=\"axis\" x=\"{LEFT}\" y=\"{base}\">{}</text>",
        esc(&points[0].sampled_at)
    );
    if points.len() > 1 {
        let _ = write!(
            out,
            "<text class=\"axis\" x=\"{:.1}\" y=\"{base}\" text-anchor=\"end\">{}</text>",
            WIDTH - RIGHT,
            esc(&points[points.len() - 1].sampled_at)
        );
    }
    for (i, scope) in scopes.iter().enumerate() {
        let series: Vec<(&HistoryPoint, i64)> =
            points.iter().map(|p| (p, value(p, scope))).collect();
        let coords: Vec<String> = series
            .iter()
            .map(|(p, n)| format!("{:.1},{:.1}", x(p.sampled_at_unix), y(*n)))
            .collect();
        let _ = write!(
            out,
            "<g class=\"series s{i}\" data-scope=\"{}\"><polyline points=\"{}\"/>",
            esc(scope),
            coords.join(" ")
        );
        for (p, n) in &series {
            let _ = write!(
                out,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\"><title>{} {}: {} exposed</title></circle>",
                x(p.sampled_at_unix),
                y(*n),
                esc(&p.sampled_at),
                esc(scope),
                count(*n)
            );
        }
        out.push_str("</g>");
    }
    out.push_str("</svg><ul class=\"legend\">");
    for (i, scope) in scopes.iter().enumerate() {
        let last = value(&points[points.len() - 1], scope);
        let _ = write!(
            out,
            "<li class=\"s{i}\">{} <span class=\"muted\">({} now)</span></li>",
            esc(scope),
            count(last)
        );
    }
    out.push_str("</ul>");
    out
}

/// Every scope that appears in any snapshot, in the snapshots' order.
fn scopes(points: &[HistoryPoint]) -> Vec<String> {
    let mut scopes: Vec<String> = Vec::new();
    for p in points {
        for (s, _) in &p.exposed {
            if !scopes.contains(s) {
                scopes.push(s.clone());
            }
        }
    }
    scopes
}

/// A scope missing from a snapshot had nothing exposed then.
fn value(p: &HistoryPoint, scope: &str) -> i64 {
    p.exposed
        .iter()
        .find(|(s, _)| s == scope)
        .map_or(0, |(_, n)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(at: &str, unix: f64, exposed: &[(&str, i64)]) -> HistoryPoint {
        HistoryPoint {
            sampled_at: at.into(),
            sampled_at_unix: unix,
            exposed: exposed.iter().map(|(s, n)| (s.to_string(), *n)).collect(),
        }
    }

    #[test]
    fn one_line_per_scope_with_a_point_per_snapshot() {
        let svg = history(&[
            point(
                "2026-01-01T00:00:00Z",
                0.0,
                &[("hashes", 100), ("wrappers", 40)],
            ),
            point("2026-01-01T00:10:00Z", 600.0, &[("hashes", 50)]),
        ]);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 4);
        assert!(
            svg.contains("2026-01-01T00:10:00Z wrappers: 0 exposed"),
            "{svg}"
        );
        // The largest value sits on the top grid line, 0 on the bottom one.
        assert!(
            svg.contains(&format!("points=\"{LEFT:.1},{TOP:.1} ")),
            "{svg}"
        );
    }

    #[test]
    fn no_snapshot_says_so() {
        assert!(history(&[]).contains("No history yet"));
    }

    #[test]
    fn scope_names_are_escaped() {
        let svg = history(&[point("t", 0.0, &[("<x>", 1)])]);
        assert!(svg.contains("&lt;x&gt;") && !svg.contains("<x>"));
    }
}
