//! The read-only web console (`console.listen`; issue #22): the job table
//! with progress, rate and ETA, one job's ranges, events and item errors,
//! the exposure inventory and its history, pauses and throttling.
//!
//! - [`page`]: the two pages as HTML, from plain data.
//! - [`chart`]: the inventory history as inline SVG.
//! - [`html`]: escaping, the page frame, short formats.
//!
//! Server-rendered HTML: the tables work without JavaScript; a small
//! script (embedded, like the stylesheet) re-fetches the page every
//! [`REFRESH_SECONDS`] and swaps its body. Only GET routes, no forms, no
//! external URL (the Content-Security-Policy allows nothing but the
//! console's own stylesheet and script). It shows what `pqmig status`
//! does and nothing secret: no key material, no wrapped keys, no
//! connection string. Every page reads in one short read-only transaction
//! on the daemon's pool, one page at a time, so a console left open never
//! holds more than one of the workers' connections.

mod chart;
pub mod html;
mod page;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use tokio::sync::Semaphore;
use tokio_postgres::IsolationLevel;

use crate::daemon::{ServiceError, Shared};
use crate::db::{inventory, pauses, ranges, status};

/// How often the script refreshes a page.
pub const REFRESH_SECONDS: u64 = 5;

/// The server cancels a page's statements after this.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a page waits for the one reading slot (another page's read).
const READ_WAIT: Duration = Duration::from_secs(5);

/// Finished jobs listed after the unfinished ones.
const FINISHED_SHOWN: i64 = 50;

/// Events and item errors on a job's page.
const EVENTS_SHOWN: i64 = 50;
const ERRORS_SHOWN: i64 = 50;

const CSS: &str = include_str!("console.css");
const JS: &str = include_str!("console.js");

const CSP: &str = "default-src 'none'; style-src 'self'; script-src 'self'; \
    connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

#[derive(Clone)]
struct Console {
    shared: Arc<Shared>,
    /// One page reads at a time.
    reads: Arc<Semaphore>,
}

/// The console's routes: `/console`, `/console/jobs/{id}`, its stylesheet
/// and script, and `/` redirecting to `/console`. Every other path under
/// `/console/` is a 404 page.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console") }))
        .route("/console", get(overview))
        .route("/console/", get(|| async { Redirect::to("/console") }))
        .route("/console/jobs/{id}", get(job))
        .route("/console/console.css", get(|| asset("text/css", CSS)))
        .route("/console/console.js", get(|| asset("text/javascript", JS)))
        .route("/console/{*rest}", get(not_found))
        .with_state(Console {
            shared,
            reads: Arc::new(Semaphore::new(1)),
        })
}

/// Why a page could not be read.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("another console page has been reading for {READ_WAIT:?}; try again")]
    Busy,
    #[error(transparent)]
    Service(#[from] ServiceError),
}

impl From<tokio_postgres::Error> for ReadError {
    fn from(e: tokio_postgres::Error) -> ReadError {
        ReadError::Service(e.into())
    }
}

async fn overview(State(c): State<Console>) -> Response {
    match read_overview(&c).await {
        Ok(o) => html(
            StatusCode::OK,
            "Jobs",
            html::Nav::Overview,
            &page::overview(&o),
        ),
        Err(e) => unavailable(e),
    }
}

async fn job(State(c): State<Console>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return missing(&format!("no job with id {id}"));
    };
    match read_job(&c, id).await {
        Ok(Some(p)) => html(
            StatusCode::OK,
            &format!("Job {id}"),
            html::Nav::Job(id),
            &page::job(&p),
        ),
        Ok(None) => missing(&format!("no job with id {id}")),
        Err(e) => unavailable(e),
    }
}

async fn not_found() -> Response {
    missing("no such page")
}

/// Run `read` in one short read-only transaction (one snapshot: a job's
/// progress and its ranges agree), holding the reading slot.
macro_rules! in_snapshot {
    ($c:expr, |$tx:ident| $body:block) => {{
        let _slot = tokio::time::timeout(READ_WAIT, $c.reads.acquire())
            .await
            .map_err(|_| ReadError::Busy)?
            .expect("the semaphore is never closed");
        let mut client = $c.shared.client().await?;
        let txn = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        crate::db::local_statement_timeout(&txn, STATEMENT_TIMEOUT).await?;
        let $tx: &tokio_postgres::Transaction<'_> = &txn;
        let value = $body;
        txn.commit().await?;
        value
    }};
}

async fn read_overview(c: &Console) -> Result<page::Overview, ReadError> {
    let shared = &c.shared;
    let replica = page::Replica {
        worker_id: shared.worker_id.clone(),
        brake: *shared.brake.borrow(),
        draining: shared.health.draining.load(Ordering::Relaxed),
        database_ok: shared.health.database_ok.load(Ordering::Relaxed),
    };
    Ok(in_snapshot!(c, |tx| {
        let jobs = status::jobs_list(tx, FINISHED_SHOWN).await?;
        let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
        page::Overview {
            replica,
            pauses: pauses::pauses_active(tx).await?,
            paused: pauses::jobs_paused(tx, &ids).await?,
            jobs,
            snapshot: inventory::inventory_latest(tx).await?,
            history: inventory::inventory_history(tx).await?,
        }
    }))
}

async fn read_job(c: &Console, id: i64) -> Result<Option<page::JobPage>, ReadError> {
    Ok(in_snapshot!(c, |tx| {
        match status::job_get(tx, id).await? {
            None => None,
            Some(job) => {
                let (errors, errors_total) = status::job_item_errors(tx, id, ERRORS_SHOWN).await?;
                Some(page::JobPage {
                    paused: !pauses::jobs_paused(tx, &[id]).await?.is_empty(),
                    ranges: ranges::ranges_of_job(tx, id).await?,
                    events: status::job_events(tx, id, EVENTS_SHOWN).await?,
                    errors,
                    errors_total,
                    job,
                })
            }
        }
    }))
}

/// Headers every console response carries.
fn hardened(mut r: Response, content_type: &'static str) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn html(code: StatusCode, title: &str, nav: html::Nav<'_>, body: &str) -> Response {
    hardened(
        (code, html::frame(title, nav, body)).into_response(),
        "text/html; charset=utf-8",
    )
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    hardened(body.into_response(), content_type)
}

/// 404 with one line saying what is missing.
fn missing(what: &str) -> Response {
    let body = format!("<p id=\"message\" class=\"error\">{}</p>", html::esc(what));
    html(
        StatusCode::NOT_FOUND,
        "Not found",
        html::Nav::Other("not found"),
        &body,
    )
}

/// 503 naming the database (the reason has no secret: pool errors are
/// described by the pool's settings, server errors by their message).
fn unavailable(e: ReadError) -> Response {
    tracing::warn!(error = %e, "the console could not read the database");
    let body = format!(
        "<p id=\"message\" class=\"error\">The database could not be read: {}</p>",
        html::esc(&e.to_string())
    );
    html(
        StatusCode::SERVICE_UNAVAILABLE,
        "Database unavailable",
        html::Nav::Other("database unavailable"),
        &body,
    )
}
