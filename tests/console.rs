//! The web console (issue #22) in a real browser: headless Chromium (Debian
//! `chromium`, installed by `.ci/setup`) loads the pages of a running
//! daemon whose database holds a job in each state, and the DOM it
//! rendered is checked against the database. Also: 404s, a 503 page when
//! the database cannot be read, and where the console is served.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use crate::observe::http_get;
use crate::support::hashes::Fixture;
use crate::support::{InProcess, run, stderr, wait_until};

/// Chromium with `args` then `url`; its stdout. A fresh profile each time,
/// so tests in parallel never share one.
async fn chromium(args: &[&str], url: &str) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut cmd = tokio::process::Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(args)
    .arg(url)
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("chromium within 120 s")
        .expect("run chromium (Debian package `chromium`; .ci/setup installs it)");
    assert!(
        out.status.success(),
        "chromium {args:?} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 DOM")
}

/// The DOM after the page loaded (its script run, none of its timers).
async fn dom(url: &str) -> String {
    chromium(&["--dump-dom"], url).await
}

/// The part of `dom` from the tag starting with `start` to the first
/// `end` after it.
fn element<'a>(dom: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = dom.find(start)?;
    let len = dom[from..].find(end)? + end.len();
    Some(&dom[from..from + len])
}

/// The value of attribute `name` on the first tag of `el` having it.
fn attr<'a>(el: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let from = el.find(&key)? + key.len();
    Some(&el[from..from + el[from..].find('"')?])
}

/// (id, status, processed, failed) of every job as `pqmig status` counts
/// them: a running split job's counts are its ranges' (current to the last
/// batch; the job row has them as of the last heartbeat).
async fn jobs_in_database(fx: &Fixture) -> Vec<(i64, String, i64, i64)> {
    let rows = fx
        .db
        .client()
        .await
        .query(
            "SELECT j.id, j.status, \
               CASE WHEN j.status = 'running' AND j.ranges IS NOT NULL \
                 THEN (SELECT sum(processed_count)::bigint FROM pq_migration_ranges r WHERE r.job_id = j.id) \
                 ELSE j.processed_count END, \
               CASE WHEN j.status = 'running' AND j.ranges IS NOT NULL \
                 THEN (SELECT sum(failed_count)::bigint FROM pq_migration_ranges r WHERE r.job_id = j.id) \
                 ELSE j.failed_count END \
             FROM pq_migration_jobs j ORDER BY j.id",
            &[],
        )
        .await
        .expect("jobs");
    rows.iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// Markup an operator or the host put into a job's error and an item's
/// message: rendered as text, it shows up escaped in the DOM; rendered as
/// HTML, Chromium would have made elements of it.
const HOSTILE_ERROR: &str =
    "2 items failed; first: version <b id=\"xss-error\">v1</b> & no profile";
const HOSTILE_MESSAGE: &str =
    "<img id=\"xss-item\" src=\"x\"> <script>document.title='owned'</script> bad version";

/// A daemon with a split hashes job running (paused mid-way, so its
/// progress holds still while the browser looks) and, inserted beside it,
/// a job in each other state, three older inventory snapshots and the
/// events and item errors of the failed job. Returns the ids: (running,
/// failed).
async fn jobs_in_each_state(fx: &Fixture) -> (InProcess, i64, i64) {
    let c = fx.db.client().await;
    c.batch_execute(
        "INSERT INTO pq_migration_inventory (sampled_at, kind, scope, algorithm, items) \
         SELECT now() - m * interval '10 minutes', 'vulnerable', s, a, n \
         FROM (VALUES (4, 'hashes', 'SHA-256', 3000), (3, 'hashes', 'SHA-256', 3000), \
                      (2, 'hashes', 'SHA-256', 2800), (4, 'wrappers', 'X25519', 900), \
                      (3, 'wrappers', 'X25519', 400), (2, 'wrappers', 'X25519', 0)) v(m, s, a, n)",
    )
    .await
    .expect("older snapshots");
    // The split sizes ranges from the planner's estimate.
    c.batch_execute("ANALYZE users").await.expect("analyze");
    let daemon = InProcess::start(fx, &[("PQMIG_RANGE_ITEMS", "1000")]).await;
    let running = fx.enqueue(json!({"max_rate": 300, "batch_size": 50})).await;
    let walked = || async {
        c.query_one(
            "SELECT COALESCE(sum(processed_count), 0)::bigint FROM pq_migration_ranges WHERE job_id = $1",
            &[&running],
        )
        .await
        .expect("walked")
        .get::<_, i64>(0)
    };
    wait_until(60, "the job walks its ranges", || async {
        walked().await >= 300
    })
    .await;
    let out = run(
        &["pause", "--scope", "hashes"],
        &[("DATABASE_URL", fx.db.url.as_str())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // Paused walks give their ranges back: the counts hold still.
    wait_until(30, "the paused walks give their ranges back", || async {
        c.query_one(
            "SELECT count(*) FROM pq_migration_ranges WHERE job_id = $1 AND status = 'running'",
            &[&running],
        )
        .await
        .expect("ranges")
        .get::<_, i64>(0)
            == 0
    })
    .await;
    assert_eq!(fx.job(running).await.status, "running");

    let failed: i64 = c
        .query_one(
            "INSERT INTO pq_migration_jobs (scope, target_algo_id, status, started_at, finished_at, \
                                            processed_count, failed_count, total_count, error, selection) \
             VALUES ('hashes', $1, 'failed', now() - interval '5 minutes', now() - interval '4 minutes', \
                     118, 2, 120, $2, '{\"table\":\"users\",\"column\":\"email_hash\"}') RETURNING id",
            &[&fx.algo_id, &HOSTILE_ERROR],
        )
        .await
        .expect("failed job")
        .get(0);
    c.execute(
        "INSERT INTO pq_migration_item_errors (job_id, item_id, error_code, message) \
         VALUES ($1, '17', 'data', $2), ($1, '18', 'integrity', 'tag mismatch')",
        &[&failed, &HOSTILE_MESSAGE],
    )
    .await
    .expect("item errors");
    c.execute(
        "INSERT INTO pq_migration_job_events (job_id, event, worker, detail) \
         VALUES ($1, 'claimed', 'host-1-abc', NULL), ($1, 'failed', 'host-1-abc', '{\"reason\":\"<i>2 items</i>\"}')",
        &[&failed],
    )
    .await
    .expect("events");
    c.execute(
        "INSERT INTO pq_migration_jobs (scope, target_algo_id, status, started_at, finished_at, \
                                        processed_count, total_count, result) \
         VALUES ('hashes', $1, 'done', now() - interval '2 hours', now() - interval '1 hour', \
                 2500, 2500, '{\"migrated\": 2500}')",
        &[&fx.algo_id],
    )
    .await
    .expect("done job");
    c.batch_execute(
        "INSERT INTO pq_migration_jobs (scope, status, processed_count, failed_count, total_count, started_at) \
           VALUES ('hashes', 'cancelled', 40, 1, 100, now() - interval '30 minutes'); \
         INSERT INTO pq_migration_jobs (scope, status, scheduled_at) \
           VALUES ('wrappers', 'pending', now() + interval '1 day');",
    )
    .await
    .expect("cancelled and pending jobs");
    wait_until(60, "the daemon counts the inventory", || async {
        c.query_one(
            "SELECT count(DISTINCT sampled_at) FROM pq_migration_inventory",
            &[],
        )
        .await
        .expect("snapshots")
        .get::<_, i64>(0)
            >= 4
    })
    .await;
    (daemon, running, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_renders_every_job_as_the_database_has_it() {
    let fx = Fixture::new(3000).await;
    let (daemon, running, failed) = jobs_in_each_state(&fx).await;
    let base = format!("http://{}", daemon.addr);
    let page = dom(&format!("{base}/console")).await;

    let jobs = jobs_in_database(&fx).await;
    assert_eq!(jobs.len(), 5, "{jobs:?}");
    let statuses: Vec<&str> = jobs.iter().map(|j| j.1.as_str()).collect();
    for s in ["pending", "running", "done", "failed", "cancelled"] {
        assert!(statuses.contains(&s), "a {s} job: {statuses:?}");
    }
    assert_eq!(page.matches("<tr id=\"job-").count(), jobs.len(), "{page}");
    for (id, status, processed, failed) in &jobs {
        let row = element(&page, &format!("<tr id=\"job-{id}\""), "</tr>")
            .unwrap_or_else(|| panic!("no row for job {id}: {page}"));
        assert_eq!(attr(row, "data-status"), Some(status.as_str()), "{row}");
        assert_eq!(
            attr(row, "data-processed"),
            Some(processed.to_string().as_str()),
            "{row}"
        );
        assert_eq!(
            attr(row, "data-failed"),
            Some(failed.to_string().as_str()),
            "{row}"
        );
        let bar = element(row, "<progress", "</progress>").expect("a progress bar");
        if status == "pending" {
            // Not started: no total yet, an indeterminate bar.
            assert_eq!(attr(bar, "value"), None, "{row}");
        } else {
            let walked = (processed + failed).to_string();
            assert_eq!(attr(bar, "value"), Some(walked.as_str()), "{row}");
        }
    }
    let paused_row = element(&page, &format!("<tr id=\"job-{running}\""), "</tr>").unwrap();
    assert!(paused_row.contains(">paused<"), "{paused_row}");
    let pending_row = element(&page, "data-status=\"pending\"", "</tr>").unwrap();
    assert!(pending_row.contains("scheduled 20"), "{pending_row}");
    assert!(paused_row.contains("/3 ranges"), "{paused_row}");
    let done_row = element(&page, "data-status=\"done\"", "</tr>").unwrap();
    assert!(done_row.contains(">100%<"), "{done_row}");
    assert!(
        page.contains("hashes jobs since"),
        "the pause is shown: {page}"
    );
    assert!(page.contains("not throttled"), "{page}");

    // The job's error is text, not markup.
    assert!(
        !page.contains("<b "),
        "markup from the database rendered: {page}"
    );
    assert!(
        page.contains("version &lt;b id=\"xss-error\"&gt;v1&lt;/b&gt; &amp; no profile"),
        "{page}"
    );

    // The inventory by scope and algorithm, and its history as a chart.
    let inventory = element(&page, "<table class=\"inventory\"", "</table>").expect("inventory");
    let newest = fx
        .db
        .client()
        .await
        .query(
            "SELECT CASE kind WHEN 'vulnerable' THEN 'exposed' ELSE kind END, scope, algorithm, items \
             FROM pq_migration_inventory \
             WHERE sampled_at = (SELECT max(sampled_at) FROM pq_migration_inventory)",
            &[],
        )
        .await
        .expect("newest snapshot");
    assert!(newest.len() >= 2, "{newest:?}");
    assert_eq!(
        inventory.matches("<tr class=").count(),
        newest.len(),
        "{inventory}"
    );
    for r in &newest {
        let (kind, scope, algorithm, items): (String, String, String, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let line = format!(
            "<tr class=\"{kind}\" data-scope=\"{scope}\" data-algorithm=\"{algorithm}\" data-items=\"{items}\">"
        );
        assert!(inventory.contains(&line), "{line} in {inventory}");
    }
    let chart = element(&page, "<svg class=\"chart\"", "</svg>").expect("the history chart");
    assert_eq!(chart.matches("<polyline").count(), 2, "{chart}");
    assert!(chart.matches("<circle").count() >= 8, "{chart}");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no external URL: {page}"
    );

    // The running job: its ranges as the database has them, its events.
    let page = dom(&format!("{base}/console/jobs/{running}")).await;
    let ranges = fx
        .db
        .client()
        .await
        .query(
            "SELECT range_no, status, processed_count, failed_count FROM pq_migration_ranges \
             WHERE job_id = $1 ORDER BY range_no",
            &[&running],
        )
        .await
        .expect("ranges");
    assert_eq!(ranges.len(), 3);
    assert_eq!(
        page.matches("<tr id=\"range-").count(),
        ranges.len(),
        "{page}"
    );
    for r in &ranges {
        let (n, status, p, f): (i32, String, i64, i64) = (r.get(0), r.get(1), r.get(2), r.get(3));
        let row = element(&page, &format!("<tr id=\"range-{n}\""), "</tr>").expect("range row");
        assert_eq!(attr(row, "data-status"), Some(status.as_str()), "{row}");
        let bar = element(row, "<progress", "</progress>").expect("range bar");
        if p + f > 0 {
            assert_eq!(
                attr(bar, "value"),
                Some((p + f).to_string().as_str()),
                "{row}"
            );
        }
    }
    assert!(page.contains("<tr class=\"event\">"), "{page}");
    assert!(page.contains(">paused<"), "{page}");

    // The failed job: its events and item errors, escaped.
    let page = dom(&format!("{base}/console/jobs/{failed}")).await;
    assert_eq!(page.matches("<tr class=\"event\">").count(), 2, "{page}");
    assert_eq!(
        page.matches("<tr class=\"item-error\">").count(),
        2,
        "{page}"
    );
    assert!(!page.contains("<img"), "{page}");
    assert!(
        page.contains("&lt;img id=\"xss-item\" src=\"x\"&gt; &lt;script&gt;document.title='owned'&lt;/script&gt; bad version"),
        "{page}"
    );
    assert!(
        page.contains(&format!("<title>Job {failed} · pqmig</title>")),
        "no script of the database ran: {page}"
    );
    assert!(!page.contains("<i>2 items</i>"), "{page}");
    assert!(!page.contains("<b "), "{page}");

    // The screenshot README shows.
    let shot = concat!(env!("CARGO_TARGET_TMPDIR"), "/console.png");
    let _ = std::fs::remove_file(shot);
    chromium(
        &[
            &format!("--screenshot={shot}"),
            "--window-size=1280,900",
            "--hide-scrollbars",
        ],
        &format!("{base}/console"),
    )
    .await;
    let png = std::fs::read(shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    daemon.stop().await;
}

/// The tables are in the HTML the server sends (what a browser without
/// JavaScript shows; headless Chromium cannot dump a DOM with scripts
/// off); with JavaScript the page refreshes itself (Chromium's virtual
/// time runs its timers without waiting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_without_javascript_and_refreshes_itself_with_it() {
    let fx = Fixture::new(10).await;
    let id = fx.enqueue(json!({})).await;
    let daemon = InProcess::start(&fx, &[]).await;
    fx.wait_job(id, 60, |j| j.status == "done").await;
    let url = format!("http://{}/console", daemon.addr);

    let (code, page) = http_get(daemon.addr, "/console").await;
    assert_eq!(code, 200);
    let row = element(&page, &format!("<tr id=\"job-{id}\""), "</tr>")
        .unwrap_or_else(|| panic!("no row for job {id}: {page}"));
    assert_eq!(attr(row, "data-status"), Some("done"), "{row}");
    assert!(row.contains("<progress value=\"10\" max=\"10\">"), "{row}");
    assert!(page.contains("<noscript>"), "{page}");
    let (code, script) = http_get(daemon.addr, "/console/console.js").await;
    assert_eq!(code, 200);
    assert!(script.contains("DOMParser"), "{script}");

    let page = chromium(&["--virtual-time-budget=16000", "--dump-dom"], &url).await;
    let refreshes: u32 = attr(&page, "data-refreshes")
        .unwrap_or_else(|| panic!("the page never refreshed: {page}"))
        .parse()
        .unwrap();
    assert!(
        refreshes >= 2,
        "{refreshes} refreshes in 16 s of virtual time"
    );
    assert!(page.contains(&format!("<tr id=\"job-{id}\"")), "{page}");
    daemon.stop().await;
}

#[tokio::test]
async fn an_unknown_job_is_a_404_with_one_line() {
    let fx = Fixture::new(0).await;
    let daemon = InProcess::start(&fx, &[]).await;
    let (code, body) = http_get(daemon.addr, "/console/jobs/424242").await;
    assert_eq!(code, 404);
    assert!(
        body.contains("<p id=\"message\" class=\"error\">no job with id 424242</p>"),
        "{body}"
    );
    let (code, body) = http_get(daemon.addr, "/console/jobs/%3Cb%3E").await;
    assert_eq!(code, 404);
    assert!(body.contains("no job with id &lt;b&gt;"), "{body}");
    let (code, _) = http_get(daemon.addr, "/console/nothing-here").await;
    assert_eq!(code, 404);
    // Read-only: nothing answers anything but GET.
    let (code, _) = http_post(daemon.addr, "/console").await;
    assert_eq!(code, 405);
    daemon.stop().await;
}

async fn http_post(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    )
    .await
    .expect("request");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("response");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

/// A database that cannot be reached: the console answers 503 naming
/// it, the probes keep answering.
#[tokio::test]
async fn an_unreachable_database_is_a_503_page() {
    let fx = Fixture::new(0).await;
    let unused = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = unused.local_addr().unwrap().port();
    drop(unused);
    let url = format!("postgres://postgres@127.0.0.1:{port}/nowhere");
    let daemon = InProcess::start(&fx, &[("DATABASE_URL", url.as_str())]).await;
    let (code, body) = http_get(daemon.addr, "/console").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("The database could not be read:"), "{body}");
    assert!(
        !body.contains("postgres://"),
        "no connection string: {body}"
    );
    let (code, _) = http_get(daemon.addr, "/livez").await;
    assert_eq!(code, 200);
    daemon.stop().await;
}

/// `console.listen`: unset serves it beside /metrics; an address on a
/// listener of its own (and not beside /metrics); `off` nowhere; anything
/// else is one line naming the key.
#[tokio::test]
async fn console_listen_picks_the_listener() {
    let fx = Fixture::new(0).await;
    let own = InProcess::start(&fx, &[("PQMIG_CONSOLE_ADDR", "127.0.0.1:0")]).await;
    let console = own.console.expect("a listener of its own");
    assert_ne!(console, own.addr);
    let (code, body) = http_get(console, "/console").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(http_get(own.addr, "/console").await.0, 404);
    assert_eq!(http_get(own.addr, "/metrics").await.0, 200);
    own.stop().await;

    let off = InProcess::start(&fx, &[("PQMIG_CONSOLE_ADDR", "off")]).await;
    assert!(off.console.is_none());
    assert_eq!(http_get(off.addr, "/console").await.0, 404);
    off.stop().await;

    let env: Vec<(String, String)> = fx.daemon_env();
    for (value, reason) in [
        ("localhost", "is not an address:port or \"off\""),
        ("127.0.0.1:9464", "is metrics.listen"),
    ] {
        let mut env = env.clone();
        env.push(("PQMIG_METRICS_ADDR".into(), "127.0.0.1:9464".into()));
        env.push(("PQMIG_CONSOLE_ADDR".into(), value.into()));
        let lookup = |k: &str| {
            env.iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        let err = pqmig::config::Config::load(&pqmig::config::Sources {
            flags: Default::default(),
            env: &lookup,
        })
        .expect_err(value)
        .to_string();
        assert!(err.starts_with("console.listen: "), "{err}");
        assert!(
            err.contains(reason) && err.ends_with("(from PQMIG_CONSOLE_ADDR)"),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
    }
}
