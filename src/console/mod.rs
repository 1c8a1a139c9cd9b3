//! The web console (`serve --console`): pages that show jobs, their progress and their images, the
//! server's devices and the queue, served on the gRPC port by the same process (routes beside the gRPC
//! services in tonic's axum router, so the same TLS and the same Service carry both).
//!
//! - **Pages**: one HTML shell with its script and style, embedded in the binary (`assets/`); the
//!   script renders `/console/` (jobs), `/console/jobs/<id>` and `/console/workers` from the JSON
//!   routes below. No build step: plain JavaScript, no framework.
//! - **Access**: the API's bearer tokens and roles. The login form posts a token once; the server
//!   checks it and keeps it in an `HttpOnly`, `SameSite=Strict` cookie (`Secure` under TLS), never in
//!   a URL or in script-readable storage. Every data route checks the cookie's token against the token
//!   file as it is now (a token removed from the file stops working at once), and acts through the
//!   gRPC handlers with that caller, so roles, validation and errors are the API's own. Requests that
//!   change something must also carry an `X-DDPM-Console` header, which a cross-site form cannot send.
//! - **Live**: server-sent events from [`feeds`], where one task per watched job (and one for the job
//!   list) reads the queue however many browsers watch.
//! - **Images**: a job's grids, manifest, index parts and dataset card are read from its output store
//!   by the server (local folder or S3 alike), so browsers need no bucket credentials.

pub mod feeds;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use futures_util::Stream;
use serde::{Deserialize, Serialize};

use crate::api::auth::{Auth, Caller, Role};
use crate::api::handlers::WorkerService;
use crate::api::pb;
use crate::api::pb::worker_service_server::WorkerService as _;
use crate::storage::check_key;

/// The cookie that holds the console's token (hex, so any token fits a cookie value).
const COOKIE: &str = "ddpm_console";
/// The header that requests which change something must carry (see the module's docs).
const ACTION_HEADER: &str = "x-ddpm-console";
/// Where the console lives on the port.
pub const PREFIX: &str = "/console";

const INDEX_HTML: &str = include_str!("assets/index.html");
const CONSOLE_JS: &str = include_str!("assets/console.js");
const CONSOLE_CSS: &str = include_str!("assets/console.css");

/// The console's routes and what they share.
#[derive(Clone)]
pub struct Console {
    service: WorkerService,
    auth: Option<Arc<Auth>>,
    /// Whether the port is TLS (the cookie is then `Secure`).
    secure: bool,
    feeds: Arc<feeds::Feeds>,
}

impl Console {
    pub fn new(service: WorkerService, auth: Option<Arc<Auth>>, secure: bool) -> Console {
        let feeds = Arc::new(feeds::Feeds::new(service.clone()));
        Console { service, auth, secure, feeds }
    }

    /// The routes, under [`PREFIX`].
    pub fn router(self) -> axum::Router {
        let at = |path: &str| format!("{PREFIX}{path}");
        axum::Router::new()
            .route(PREFIX, get(|| async { Redirect::permanent("/console/") }))
            .route(&at("/"), get(page))
            .route(&at("/login"), get(page))
            .route(&at("/workers"), get(page))
            .route(&at("/jobs/{id}"), get(page))
            .route(&at("/assets/console.js"), get(|| asset(CONSOLE_JS, "text/javascript; charset=utf-8")))
            .route(&at("/assets/console.css"), get(|| asset(CONSOLE_CSS, "text/css; charset=utf-8")))
            .route(&at("/api/session"), get(session))
            .route(&at("/api/login"), post(login))
            .route(&at("/api/logout"), post(logout))
            .route(&at("/api/jobs/events"), get(jobs_events))
            .route(&at("/api/jobs/{id}"), get(job))
            .route(&at("/api/jobs/{id}/events"), get(job_events))
            .route(&at("/api/jobs/{id}/cancel"), post(cancel))
            .route(&at("/api/jobs/{id}/retry"), post(retry))
            .route(&at("/api/jobs/{id}/files/{*path}"), get(file))
            .route(&at("/api/workers"), get(workers))
            .with_state(self)
    }
}

/// An error as the console's routes answer it: the gRPC status's code name and message, with the HTTP
/// status that means the same.
#[derive(Debug)]
pub struct ConsoleError {
    code: tonic::Code,
    message: String,
}

impl ConsoleError {
    fn new(code: tonic::Code, message: impl Into<String>) -> ConsoleError {
        ConsoleError { code, message: message.into() }
    }
}

impl From<tonic::Status> for ConsoleError {
    fn from(status: tonic::Status) -> ConsoleError {
        ConsoleError { code: status.code(), message: status.message().to_string() }
    }
}

impl From<crate::api::error::ServiceError> for ConsoleError {
    fn from(e: crate::api::error::ServiceError) -> ConsoleError {
        tonic::Status::from(e).into()
    }
}

/// The HTTP status of a gRPC code (as the gRPC-HTTP mapping of Google's APIs gives it).
fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code;
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let code = format!("{:?}", self.code);
        let body = serde_json::json!({ "code": screaming(&code), "message": self.message });
        (http_status(self.code), Json(body)).into_response()
    }
}

/// `PermissionDenied` → `PERMISSION_DENIED`, the name the protobuf JSON mapping gives the code.
fn screaming(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// The caller of a console request: the cookie's token's, or anyone's on a server without tokens.
pub struct Session(Caller);

impl FromRequestParts<Console> for Session {
    type Rejection = ConsoleError;

    async fn from_request_parts(parts: &mut Parts, console: &Console) -> Result<Session, ConsoleError> {
        let Some(auth) = &console.auth else { return Ok(Session(Caller::anonymous())) };
        let jar = CookieJar::from_headers(&parts.headers);
        let unauthenticated = |why: &str| ConsoleError::new(tonic::Code::Unauthenticated, why);
        let cookie = jar.get(COOKIE).ok_or_else(|| unauthenticated("log in with a token"))?;
        let token = hex::decode(cookie.value())
            .ok()
            .and_then(|t| String::from_utf8(t).ok())
            .ok_or_else(|| unauthenticated("the console's cookie is not a token: log in again"))?;
        let caller = auth.authenticate_token(&token).map_err(|e| {
            tracing::debug!(error = %e, "console request refused");
            ConsoleError::from(e)
        })?;
        Ok(Session(caller))
    }
}

fn too_many_viewers() -> ConsoleError {
    ConsoleError::new(
        tonic::Code::ResourceExhausted,
        format!("{} console event streams are open on this server; try again later", feeds::MAX_VIEWERS),
    )
}

/// A request with `caller` on it, as the token interceptor puts it on gRPC requests.
fn as_caller<T>(caller: &Caller, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.extensions_mut().insert(caller.clone());
    request
}

/// Requests that change something must carry [`ACTION_HEADER`]: a page of another site can make a
/// browser post a form here, but not add a header without the CORS preflight this server never grants.
fn check_action(headers: &HeaderMap) -> Result<(), ConsoleError> {
    if headers.contains_key(ACTION_HEADER) {
        Ok(())
    } else {
        Err(ConsoleError::new(
            tonic::Code::PermissionDenied,
            format!("requests that change something need the {ACTION_HEADER} header"),
        ))
    }
}

async fn page() -> Response {
    let mut response = asset(INDEX_HTML, "text/html; charset=utf-8").await;
    // The shell holds no data; it is never framed by another site.
    let headers = response.headers_mut();
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
        ),
    );
    response
}

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// Who the console is logged in as.
#[derive(Debug, Serialize)]
struct SessionView {
    name: String,
    role: &'static str,
    /// Whether the server has tokens (without, there is no login and anyone may do anything).
    tokens: bool,
    /// Whether this role may cancel and retry (its own jobs with `submit`, anyone's with `admin`).
    can_act: bool,
    admin: bool,
}

impl SessionView {
    fn of(caller: &Caller, tokens: bool) -> SessionView {
        SessionView {
            name: caller.name.clone(),
            role: caller.role.as_str(),
            tokens,
            can_act: caller.role >= Role::Submit,
            admin: caller.role >= Role::Admin,
        }
    }
}

async fn session(State(console): State<Console>, Session(caller): Session) -> Json<SessionView> {
    Json(SessionView::of(&caller, console.auth.is_some()))
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

async fn login(
    State(console): State<Console>,
    headers: HeaderMap,
    jar: CookieJar,
    Json(login): Json<Login>,
) -> Result<(CookieJar, Json<SessionView>), ConsoleError> {
    check_action(&headers)?;
    let Some(auth) = &console.auth else {
        return Ok((jar, Json(SessionView::of(&Caller::anonymous(), false))));
    };
    let token = login.token.trim();
    let caller = auth.authenticate_token(token).map_err(|e| {
        tracing::info!(error = %e, "console login refused");
        ConsoleError::from(e)
    })?;
    tracing::info!(caller = caller.name, role = caller.role.as_str(), "console login");
    let cookie = Cookie::build((COOKIE, hex::encode(token)))
        .path(PREFIX)
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(console.secure)
        .build();
    Ok((jar.add(cookie), Json(SessionView::of(&caller, true))))
}

async fn logout(headers: HeaderMap, jar: CookieJar) -> Result<CookieJar, ConsoleError> {
    check_action(&headers)?;
    Ok(jar.remove(Cookie::build(COOKIE).path(PREFIX)))
}

/// The job list, live: `snapshot` (every job shown) first, then `job` for each job that changed and
/// `removed` for each that left the list (see [`feeds::Feeds::list`]).
async fn jobs_events(
    State(console): State<Console>,
    Session(caller): Session,
) -> Result<Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>>, ConsoleError> {
    caller.require(Role::Read)?;
    let stream = console.feeds.list_events(Arc::clone(&console.service.ctx)).ok_or_else(too_many_viewers)?;
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// One job now, with how its shards ran (GetJob) and which of its first grids are written.
async fn job(
    State(console): State<Console>,
    Session(caller): Session,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ConsoleError> {
    let response = console.service.get_job(as_caller(&caller, pb::GetJobRequest { job_id: id })).await?;
    let job = response.into_inner().job.unwrap_or_default();
    Ok(Json(console.feeds.job_view(&job).await))
}

/// One job, live: `job` with its state first, then at each change; the stream ends after a final state
/// (`end`), or with `error` when the job is gone.
async fn job_events(
    State(console): State<Console>,
    Session(caller): Session,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>>, ConsoleError> {
    // GetJob checks the role and the id, and says NOT_FOUND before any stream opens.
    console.service.get_job(as_caller(&caller, pb::GetJobRequest { job_id: id.clone() })).await?;
    let stream =
        console.feeds.job_events(Arc::clone(&console.service.ctx), &id).ok_or_else(too_many_viewers)?;
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

async fn cancel(
    State(console): State<Console>,
    Session(caller): Session,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ConsoleError> {
    check_action(&headers)?;
    let response =
        console.service.cancel_job(as_caller(&caller, pb::CancelJobRequest { job_id: id })).await?;
    Ok(Json(console.feeds.job_view(&response.into_inner().job.unwrap_or_default()).await))
}

async fn retry(
    State(console): State<Console>,
    Session(caller): Session,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ConsoleError> {
    check_action(&headers)?;
    let response = console.service.retry_job(as_caller(&caller, pb::RetryJobRequest { job_id: id })).await?;
    Ok(Json(console.feeds.job_view(&response.into_inner().job.unwrap_or_default()).await))
}

/// The files of a job the console links to, read from its output store: grids, the manifest, index
/// parts and the dataset card. Data files (tars, Parquet shards) and samples are left to the store's
/// own clients: they can be large, and a console has no need to proxy a dataset.
async fn file(
    State(console): State<Console>,
    Session(caller): Session,
    Path((id, path)): Path<(String, String)>,
) -> Result<Response, ConsoleError> {
    let content_type = served_file(&path).ok_or_else(|| {
        ConsoleError::new(
            tonic::Code::InvalidArgument,
            format!("path: the console serves grids/*.png, index/*.parquet, manifest.json and README.md, not {path:?}"),
        )
    })?;
    check_key(&path).map_err(|e| ConsoleError::new(tonic::Code::InvalidArgument, format!("path: {e}")))?;
    // GetJob checks the role and says NOT_FOUND of a job that is not (or no longer) there.
    console.service.get_job(as_caller(&caller, pb::GetJobRequest { job_id: id.clone() })).await?;
    let record = console
        .service
        .ctx
        .queue
        .job(&id)
        .await
        .map_err(crate::api::error::ServiceError::from)?
        .ok_or_else(|| ConsoleError::new(tonic::Code::NotFound, format!("job {id}")))?;
    let outputs = console
        .service
        .ctx
        .outputs
        .for_job(&record.id, &record.spec)
        .await
        .map_err(|e| ConsoleError::new(tonic::Code::Unavailable, e.to_string()))?;
    let key = outputs.key(&path);
    let bytes = outputs.store.get(&key).await.map_err(|e| {
        let code = if e.is_unavailable() { tonic::Code::Unavailable } else { tonic::Code::Internal };
        ConsoleError::new(code, e.to_string())
    })?;
    let bytes = bytes
        .ok_or_else(|| ConsoleError::new(tonic::Code::NotFound, format!("{path} is not written yet")))?;
    // Every object of a job is written once and never changes (a deleted job's id is never reused).
    let cache = "private, max-age=31536000, immutable";
    Ok(([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, cache)], bytes).into_response())
}

/// The content type of a job file the console serves, or `None` where it serves no such file.
fn served_file(path: &str) -> Option<&'static str> {
    let (folder, name) = path.rsplit_once('/').unwrap_or(("", path));
    match (folder, name) {
        ("grids", n) if n.ends_with(".png") => Some("image/png"),
        ("index", n) if n.ends_with(".parquet") => Some("application/vnd.apache.parquet"),
        ("", "manifest.json") => Some("application/json"),
        ("", "README.md") => Some("text/markdown; charset=utf-8"),
        _ => None,
    }
}

/// This server's devices and models, and the queue's shards.
async fn workers(
    State(console): State<Console>,
    Session(caller): Session,
) -> Result<Json<serde_json::Value>, ConsoleError> {
    let models = console.service.list_models(as_caller(&caller, pb::ListModelsRequest {})).await?;
    let ctx = &console.service.ctx;
    let counts = ctx.queue.shard_counts().await.map_err(crate::api::error::ServiceError::from)?;
    let now_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    let oldest_s = counts.oldest_queued_at_ms.map(|at| ((now_ms as i64 - at).max(0) as f64) / 1000.0);
    let models = crate::client::to_json(&models.into_inner(), "ddpm.v1.ListModelsResponse");
    let models: serde_json::Value = serde_json::from_str(&models).unwrap_or_default();
    let devices: Vec<String> =
        ctx.device_fits.lock().map(|f| f.keys().cloned().collect()).unwrap_or_default();
    Ok(Json(serde_json::json!({
        "worker": ctx.config.worker_id,
        "dtype": format!("{:?}", ctx.config.dtype).to_lowercase(),
        "maxBatchSize": ctx.config.max_batch_size,
        "devices": devices,
        "shardsRunning": ctx.active.running(),
        "draining": ctx.draining.load(std::sync::atomic::Ordering::Relaxed),
        "queueReachable": ctx.queue_reachable.load(std::sync::atomic::Ordering::Relaxed),
        "queue": {
            "queued": counts.queued,
            "leased": counts.leased,
            "oldestQueuedSeconds": oldest_s,
        },
        "models": models.get("models").cloned().unwrap_or_default(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_named_as_the_json_mapping_names_them() {
        assert_eq!(screaming(&format!("{:?}", tonic::Code::PermissionDenied)), "PERMISSION_DENIED");
        assert_eq!(screaming(&format!("{:?}", tonic::Code::Ok)), "OK");
        assert_eq!(http_status(tonic::Code::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(http_status(tonic::Code::FailedPrecondition), StatusCode::CONFLICT);
    }

    #[test]
    fn only_the_files_a_console_links_are_served() {
        assert_eq!(served_file("grids/00000.png"), Some("image/png"));
        assert_eq!(served_file("manifest.json"), Some("application/json"));
        assert_eq!(served_file("index/part-000000.parquet"), Some("application/vnd.apache.parquet"));
        assert_eq!(served_file("README.md"), Some("text/markdown; charset=utf-8"));
        assert_eq!(served_file("data/000000.tar"), None);
        assert_eq!(served_file("samples/00000000.png"), None);
        assert_eq!(served_file("grids/../manifest.json"), None);
        assert_eq!(served_file("shards/000000.json"), None);
    }
}
