//! The console's two pages as HTML, from what [`super`] read: the
//! overview (this replica, pauses, the job table, the exposure inventory
//! and its history) and one job (its fields, ranges, events, item errors).
//! Pure functions of their input, so the tests render them directly.

use std::fmt::Write;

use super::html::{clip, count, duration, esc};
use crate::daemon::governor::Brake;
use crate::db::inventory::{HistoryPoint, Snapshot};
use crate::db::pauses::{Pause, describe};
use crate::db::ranges::RangeView;
use crate::db::status::{EventView, ItemErrorView, JobView};

/// What the overview shows.
pub struct Overview {
    pub replica: Replica,
    pub pauses: Vec<Pause>,
    pub jobs: Vec<JobView>,
    /// Ids of the jobs a pause in force covers.
    pub paused: Vec<i64>,
    pub snapshot: Option<Snapshot>,
    pub history: Vec<HistoryPoint>,
}

/// The replica serving the page (the governor's brake is per process).
pub struct Replica {
    pub worker_id: String,
    pub brake: Brake,
    pub draining: bool,
    pub database_ok: bool,
}

/// What a job's page shows.
pub struct JobPage {
    pub job: JobView,
    pub paused: bool,
    pub ranges: Vec<RangeView>,
    pub events: Vec<EventView>,
    pub errors: Vec<ItemErrorView>,
    pub errors_total: i64,
}

/// Ranges listed on a job's page; past it, only those not done.
pub const RANGES_SHOWN: usize = 200;

/// Characters of a job's error in the job table (the job's page has all).
const ERROR_CLIP: usize = 160;

pub fn overview(o: &Overview) -> String {
    let mut out = String::new();
    replica(&mut out, &o.replica);
    pauses(&mut out, &o.pauses);
    out.push_str("<section id=\"jobs\"><h2>Jobs</h2>");
    if o.jobs.is_empty() {
        out.push_str("<p class=\"muted\">No jobs.</p>");
    } else {
        out.push_str(
            "<table class=\"jobs\"><thead><tr><th>Job</th><th>Scope</th><th>Target</th>\
             <th>Status</th><th>Progress</th><th class=\"num\">Processed</th>\
             <th class=\"num\">Failed</th><th class=\"num\">Rate</th><th class=\"num\">ETA</th>\
             <th class=\"num\">Age</th><th>Note</th></tr></thead><tbody>",
        );
        for j in &o.jobs {
            job_row(&mut out, j, o.paused.contains(&j.id));
        }
        out.push_str("</tbody></table>");
    }
    out.push_str("</section>");
    inventory(&mut out, o.snapshot.as_ref(), &o.history);
    out
}

fn replica(out: &mut String, r: &Replica) {
    let _ = write!(
        out,
        "<section id=\"replica\" class=\"bar\"><span>replica <code>{}</code></span>",
        esc(&r.worker_id)
    );
    if r.draining {
        out.push_str("<span class=\"badge warn\">draining</span>");
    }
    if !r.database_ok {
        out.push_str("<span class=\"badge bad\">database unreachable at the last sample</span>");
    }
    match r.brake.reason {
        Some(reason) => {
            let _ = write!(
                out,
                "<span id=\"throttle\" class=\"badge warn\">throttled: {}</span>",
                esc(reason)
            );
        }
        None => out.push_str("<span id=\"throttle\" class=\"badge ok\">not throttled</span>"),
    }
    if let Some(budget) = r.brake.items_budget {
        let _ = write!(
            out,
            "<span>items budget {} /s over {} walks</span>",
            count(budget.round() as i64),
            r.brake.walking
        );
    }
    out.push_str("</section>");
}

fn pauses(out: &mut String, pauses: &[Pause]) {
    out.push_str("<section id=\"pauses\">");
    if pauses.is_empty() {
        out.push_str("<p class=\"muted\">No pause in force.</p>");
    }
    for p in pauses {
        let _ = write!(
            out,
            "<p class=\"pause\"><span class=\"badge warn\">paused</span> {} since {}",
            esc(&describe(p.scope.as_deref(), p.table.as_deref())),
            esc(&p.paused_at)
        );
        if let Some(by) = &p.paused_by {
            let _ = write!(out, " by {}", esc(by));
        }
        match &p.until {
            Some(u) => {
                let _ = write!(out, " until {}", esc(u));
            }
            None => out.push_str(" until unpaused"),
        }
        out.push_str("</p>");
    }
    out.push_str("</section>");
}

/// Items walked so far: processed and failed, as `pqmig status` counts.
fn walked(j: &JobView) -> i64 {
    j.processed + j.failed
}

fn target(j: &JobView) -> &str {
    j.target_algo
        .as_deref()
        .or(j.target_policy.as_deref())
        .unwrap_or("-")
}

fn open(status: &str) -> bool {
    matches!(status, "pending" | "running")
}

/// A progress bar, its percentage and `walked/total`: `value` is the items
/// walked, `max` the total; without a total an open job's bar is
/// indeterminate and a finished one's is its walked items.
fn progress(out: &mut String, walked: i64, total: Option<i64>, estimated: bool, open: bool) {
    let about = if estimated { "~" } else { "" };
    match total {
        Some(t) if t > 0 => {
            let pct = (100.0 * walked as f64 / t as f64).clamp(0.0, 100.0);
            let _ = write!(
                out,
                "<progress value=\"{walked}\" max=\"{}\"></progress> \
                 <span class=\"pct\">{pct:.0}%</span> <span class=\"of\">{}/{about}{}</span>",
                t.max(walked),
                count(walked),
                count(t)
            );
        }
        _ if open => {
            let _ = write!(
                out,
                "<progress></progress> <span class=\"of\">{}/?</span>",
                count(walked)
            );
        }
        _ => {
            let _ = write!(
                out,
                "<progress value=\"{walked}\" max=\"{}\"></progress> <span class=\"of\">{}</span>",
                walked.max(1),
                count(walked)
            );
        }
    }
}

fn job_row(out: &mut String, j: &JobView, paused: bool) {
    let _ = write!(
        out,
        "<tr id=\"job-{id}\" data-status=\"{status}\" data-processed=\"{p}\" data-failed=\"{f}\">\
         <td><a href=\"/console/jobs/{id}\">{id}</a></td><td>{scope}</td><td>{target}</td>\
         <td><span class=\"status {status}\">{status}</span></td><td class=\"progress\">",
        id = j.id,
        status = esc(&j.status),
        p = j.processed,
        f = j.failed,
        scope = esc(&j.scope),
        target = esc(target(j)),
    );
    progress(out, walked(j), j.total, j.total_estimated, open(&j.status));
    let _ = write!(
        out,
        "</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
         <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"note\">",
        count(j.processed),
        count(j.failed),
        j.rate_per_second
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.0}/s")),
        // A paused job's rate is history: no ETA from it.
        j.eta_seconds
            .filter(|_| !paused)
            .map_or_else(|| "-".to_owned(), duration),
        duration(j.age_seconds),
    );
    note(out, j, paused);
    if let Some(e) = &j.error {
        let _ = write!(
            out,
            "<span class=\"error\">{}</span>",
            esc(&clip(e, ERROR_CLIP))
        );
    }
    out.push_str("</td></tr>");
}

/// Paused and throttled badges of an unfinished job.
fn note(out: &mut String, j: &JobView, paused: bool) {
    if !open(&j.status) {
        return;
    }
    if let (Some(at), None) = (&j.scheduled_at, &j.started_at) {
        let _ = write!(out, "<span class=\"muted\">scheduled {}</span> ", esc(at));
    }
    if paused {
        out.push_str("<span class=\"badge warn paused\">paused</span> ");
    }
    if let Some(t) = &j.throttled {
        let _ = write!(
            out,
            "<span class=\"badge warn throttled\">throttled: {}</span> ",
            esc(t)
        );
    }
    if let (Some(n), Some(done)) = (j.ranges, j.ranges_done) {
        let _ = write!(out, "<span class=\"muted\">{done}/{n} ranges</span> ");
    }
}

fn inventory(out: &mut String, snapshot: Option<&Snapshot>, history: &[HistoryPoint]) {
    out.push_str("<section id=\"inventory\"><h2>Exposure inventory</h2>");
    match snapshot {
        None => out.push_str(
            "<p class=\"muted\">Not counted yet: one replica counts it at start and then once per \
             <code>inventory.interval</code>.</p>",
        ),
        Some(s) => {
            let _ = write!(
                out,
                "<p class=\"muted\">Counted at {} ({} ago). Exposed: still on quantum-vulnerable \
                 crypto (backups are classical copies until purged).</p>\
                 <table class=\"inventory\"><thead><tr><th>Scope</th><th>Algorithm</th>\
                 <th>State</th><th class=\"num\">Items</th></tr></thead><tbody>",
                esc(&s.sampled_at),
                duration(s.age_seconds)
            );
            let lines = s
                .inventory
                .vulnerable
                .iter()
                .map(|e| ("exposed", e))
                .chain(s.inventory.protected.iter().map(|e| ("protected", e)));
            for (kind, e) in lines {
                let _ = write!(
                    out,
                    "<tr class=\"{kind}\" data-scope=\"{scope}\" data-algorithm=\"{algo}\" data-items=\"{n}\">\
                     <td>{scope}</td><td>{algo}</td><td><span class=\"badge {badge}\">{kind}</span></td>\
                     <td class=\"num\">{items}</td></tr>",
                    scope = esc(&e.scope),
                    algo = esc(&e.algorithm),
                    n = e.items,
                    badge = if kind == "exposed" { "bad" } else { "ok" },
                    items = count(e.items),
                );
            }
            out.push_str("</tbody></table>");
        }
    }
    out.push_str("<h3>Exposed items over time</h3>");
    out.push_str(&super::chart::history(history));
    out.push_str("</section>");
}

pub fn job(p: &JobPage) -> String {
    let j = &p.job;
    let mut out = String::new();
    let _ = write!(
        out,
        "<h1 id=\"job\" data-id=\"{id}\" data-status=\"{status}\">Job {id} \
         <span class=\"muted\">{scope} → {target}</span> \
         <span class=\"status {status}\">{status}</span></h1><section class=\"bar\">",
        id = j.id,
        status = esc(&j.status),
        scope = esc(&j.scope),
        target = esc(target(j)),
    );
    note(&mut out, j, p.paused);
    out.push_str("</section><section><div class=\"progress big\">");
    progress(
        &mut out,
        walked(j),
        j.total,
        j.total_estimated,
        open(&j.status),
    );
    out.push_str("</div><dl class=\"fields\">");
    let mut field = |name: &str, value: String| {
        let _ = write!(out, "<dt>{name}</dt><dd>{value}</dd>");
    };
    field("processed", count(j.processed));
    field("failed", count(j.failed));
    field(
        "total",
        j.total.map_or_else(
            || "not counted yet".to_owned(),
            |t| format!("{}{}", if j.total_estimated { "~" } else { "" }, count(t)),
        ),
    );
    if let Some(r) = j.rate_per_second {
        field("rate", format!("{r:.0} items/s"));
    }
    if let Some(e) = j.eta_seconds.filter(|_| !p.paused) {
        field("ETA", duration(e));
    }
    field("attempt", j.attempts.to_string());
    field("priority", j.priority.to_string());
    if let (Some(n), Some(done), Some(running)) = (j.ranges, j.ranges_done, j.ranges_running) {
        field(
            "ranges",
            format!("{n} ({done} done, {running} being walked)"),
        );
    }
    for (name, v) in [
        ("scheduled", &j.scheduled_at),
        ("started", &j.started_at),
        ("finished", &j.finished_at),
    ] {
        if let Some(v) = v {
            field(name, esc(v).to_string());
        }
    }
    field("age", duration(j.age_seconds));
    if let Some(w) = &j.worker {
        field("worker", format!("<code>{}</code>", esc(w)));
    }
    if let Some(s) = &j.selection {
        field("selection", format!("<code>{}</code>", esc(&s.to_string())));
    }
    if let Some(e) = &j.error {
        field("error", format!("<span class=\"error\">{}</span>", esc(e)));
    }
    if let Some(r) = &j.result {
        field("result", format!("<code>{}</code>", esc(&r.to_string())));
    }
    out.push_str("</dl></section>");
    ranges(&mut out, &p.ranges);
    events(&mut out, &p.events);
    item_errors(&mut out, &p.errors, p.errors_total);
    out
}

fn ranges(out: &mut String, ranges: &[RangeView]) {
    if ranges.is_empty() {
        return;
    }
    let all = ranges.len() <= RANGES_SHOWN;
    let shown: Vec<&RangeView> = ranges
        .iter()
        .filter(|r| all || r.status != "done")
        .take(RANGES_SHOWN)
        .collect();
    let _ = write!(out, "<section id=\"ranges\"><h2>Ranges</h2>");
    if !all {
        let _ = write!(
            out,
            "<p class=\"muted\">{} ranges; the first {} not done are shown.</p>",
            ranges.len(),
            shown.len()
        );
    }
    out.push_str(
        "<table><thead><tr><th>Range</th><th>Ids</th><th>Status</th><th>Progress</th>\
         <th class=\"num\">Processed</th><th class=\"num\">Failed</th><th class=\"num\">Attempts</th>\
         <th>Worker</th><th>Note</th></tr></thead><tbody>",
    );
    for r in shown {
        let _ = write!(
            out,
            "<tr id=\"range-{n}\" data-status=\"{status}\" data-processed=\"{p}\" data-failed=\"{f}\">\
             <td>{n}</td><td>{lo}..={hi}</td><td><span class=\"status {status}\">{status}</span></td>\
             <td class=\"progress\">",
            n = r.range_no,
            status = esc(&r.status),
            p = r.processed,
            f = r.failed,
            lo = r.lo.saturating_add(1),
            hi = r.hi,
        );
        let walked = r.processed + r.failed;
        // A done range's walked items are its total; an open one's
        // estimate is a guess from the planner.
        let (total, estimated) = match r.status.as_str() {
            "done" => (Some(walked), false),
            _ => (r.estimated, true),
        };
        progress(out, walked, total, estimated, r.status != "done");
        let _ = write!(
            out,
            "</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td><code>{}</code></td><td>{}</td></tr>",
            count(r.processed),
            count(r.failed),
            r.attempts,
            esc(r.worker.as_deref().unwrap_or("-")),
            r.throttled
                .as_deref()
                .map(|t| format!("<span class=\"badge warn\">throttled: {}</span>", esc(t)))
                .unwrap_or_default(),
        );
    }
    out.push_str("</tbody></table></section>");
}

fn events(out: &mut String, events: &[EventView]) {
    out.push_str("<section id=\"events\"><h2>Recent events</h2>");
    if events.is_empty() {
        out.push_str("<p class=\"muted\">No events.</p></section>");
        return;
    }
    out.push_str(
        "<table><thead><tr><th>At</th><th>Event</th><th>Worker</th><th>Detail</th></tr></thead><tbody>",
    );
    for e in events {
        let _ = write!(
            out,
            "<tr class=\"event\"><td>{}</td><td>{}</td><td><code>{}</code></td><td><code>{}</code></td></tr>",
            esc(&e.at),
            esc(&e.event),
            esc(e.worker.as_deref().unwrap_or("-")),
            esc(&e.detail.as_ref().map(|d| d.to_string()).unwrap_or_default()),
        );
    }
    out.push_str("</tbody></table></section>");
}

fn item_errors(out: &mut String, errors: &[ItemErrorView], total: i64) {
    out.push_str("<section id=\"item-errors\"><h2>Item errors</h2>");
    if total == 0 {
        out.push_str("<p class=\"muted\">No item errors.</p></section>");
        return;
    }
    let _ = write!(
        out,
        "<p class=\"muted\">{} in all; the first {} are shown.</p>\
         <table><thead><tr><th>Item</th><th>Code</th><th>Message</th></tr></thead><tbody>",
        count(total),
        errors.len()
    );
    for e in errors {
        let _ = write!(
            out,
            "<tr class=\"item-error\"><td>{}</td><td><span class=\"badge {}\">{}</span></td><td>{}</td></tr>",
            esc(&e.item_id),
            if e.error_code == "integrity" {
                "bad"
            } else {
                "warn"
            },
            esc(&e.error_code),
            esc(&e.message),
        );
    }
    out.push_str("</tbody></table></section>");
}
