//! The HTTP endpoints of README, Operations, on two addresses.
//!
//! - Operations on `http.listen`: `GET /metrics` (Prometheus text format), `GET /healthz`
//!   (the process is up), `GET /readyz` (it is consuming and its outputs are being
//!   acknowledged).
//! - The profile API on `http.api_listen` (off when empty), behind an optional bearer token
//!   (`http.api_token`), read from the committed state:
//!   - `GET /v1/profiles/{customer_id}`: the live profile, following merge redirects;
//!   - `GET /v1/lookup?kind=email&value=...`: the profile holding an identifier (the value is
//!     normalized the way events are);
//!   - `GET /v1/profiles/{customer_id}/explain`: why the members of the profile are linked.
//!
//! Opening the metrics port to Prometheus thus does not open customer data. Both run on
//! hyper, one request per connection, with a connection limit, a deadline for the request
//! head and for the whole exchange, and a 16 KiB limit on the head (431 past it). At the
//! connection limit a new connection closes the oldest one still waiting for its head, so
//! idle or slow clients cannot keep a health probe out. After its answer a connection reads
//! and drops what the client still sends, for up to 2 s, so that a client cut off mid-request
//! (an oversized head) receives the answer instead of a reset. The API
//! reads through a [`RocksReader`], so it sees each write whole once it is committed and never
//! waits for the worker. Every answer is JSON; errors are `{"error": "..."}` and never carry
//! an identifier value or an internal error text (those go to the log).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use idgraph_engine::read::{customer_for_identifier, explain, profile_by_id};
use idgraph_engine::{Normalizer, StateRead};
use idgraph_kafka::Metrics;
use idgraph_model::{Profile, SCHEMA_VERSION};
use idgraph_store_rocksdb::RocksReader;
use serde::Serialize;
use tokio::net::TcpListener;

/// What one HTTP server answers.
// Two of these exist per process, behind an `Arc`: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Site {
    /// `/metrics`, `/healthz` and `/readyz`.
    Operations {
        metrics: Metrics,
        ready: Arc<AtomicBool>,
    },
    /// The profile API; with a token, only requests that carry `Authorization: Bearer <token>`.
    Profiles {
        api: Arc<ProfileApi>,
        token: Option<String>,
        /// Where the API counts its requests.
        metrics: Metrics,
    },
}

impl Site {
    /// The `server` label of `idgraph_http_requests_total`.
    fn name(&self) -> &'static str {
        match self {
            Site::Operations { .. } => "operations",
            Site::Profiles { .. } => "profiles",
        }
    }

    fn metrics(&self) -> &Metrics {
        match self {
            Site::Operations { metrics, .. } | Site::Profiles { metrics, .. } => metrics,
        }
    }
}

/// Read access to the state, and the normalizer that turns a looked-up value into the form
/// the graph stores.
pub struct ProfileApi {
    pub state: RocksReader,
    pub normalizer: Normalizer,
}

/// What a server lets its clients take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once. Past it, a new connection closes the oldest one that has
    /// not sent a request head; only when all are serving requests do new ones wait in the
    /// listen backlog.
    pub max_connections: usize,
    /// Longest wait for a request's head, so idle or half-open connections do not pin a
    /// descriptor that RocksDB and librdkafka share.
    pub header_read_timeout: Duration,
    /// Longest a connection may last, answer included.
    pub request_timeout: Duration,
}

/// The largest request head taken (hyper's smallest allowed buffer is 8 KiB); a larger one
/// is answered 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The body of `/v1/profiles/{id}` and `/v1/lookup`.
#[derive(Debug, Serialize)]
struct ProfileResponse<'a> {
    schema_version: u32,
    /// The live id; differs from the requested one when that was absorbed by a merge.
    customer_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    redirected_from: Option<&'a str>,
    profile: &'a Profile,
}

/// One HTTP answer.
#[derive(Debug, PartialEq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    fn text(status: u16, body: &str) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
        }
    }

    fn json<T: Serialize>(status: u16, body: &T) -> Self {
        let mut body = serde_json::to_string(body).expect("responses serialize");
        body.push('\n');
        Response {
            status,
            content_type: "application/json",
            body,
        }
    }

    fn error(status: u16, message: &str) -> Self {
        Response::json(status, &serde_json::json!({ "error": message }))
    }
}

/// A running server. Dropping it shuts it down gracefully: it stops accepting, lets the
/// exchanges under way finish (within the request deadline), then ends its thread.
pub struct HttpServer {
    address: SocketAddr,
    shutdown: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    /// The bound address (useful with port 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Binds `listen` and serves `site` on a thread of its own until the returned server is
/// dropped. `what` names the setting in errors (`http.listen`).
pub fn serve(listen: &str, what: &str, site: Site, limits: Limits) -> Result<HttpServer> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the http runtime")?;
    let listener = runtime
        .block_on(TcpListener::bind(listen))
        .with_context(|| format!("cannot listen on {what} = {listen:?}"))?;
    let address = listener.local_addr()?;
    let site = Arc::new(site);
    let (shutdown, stopping) = tokio::sync::watch::channel(false);
    let thread = std::thread::spawn(move || {
        runtime.block_on(accept_until_shutdown(listener, site, limits, stopping))
    });
    Ok(HttpServer {
        address,
        shutdown,
        thread: Some(thread),
    })
}

/// Starts the operations endpoints on `http.listen` (metrics and readiness from
/// `operations`) and, unless `api.0` is empty, the profile API over `reader` on `api.0`
/// (`api.1` names the setting in errors); they serve until the returned servers are dropped.
pub fn serve_sites(
    config: &crate::config::AppConfig,
    engine: &idgraph_engine::Engine,
    operations: (Metrics, Arc<AtomicBool>),
    reader: RocksReader,
    api: (&str, &str),
) -> Result<(HttpServer, Option<HttpServer>)> {
    let (api_listen, api_setting) = api;
    if !api_listen.trim().is_empty() {
        config.http.check_api_exposure(api_listen, api_setting)?;
    }
    let limits = config.http.limits();
    let (metrics, ready) = operations;
    let operations = serve(
        &config.http.listen,
        "http.listen",
        Site::Operations {
            metrics: metrics.clone(),
            ready,
        },
        limits,
    )?;
    if api_listen.trim().is_empty() {
        return Ok((operations, None));
    }
    let api = serve(
        api_listen,
        api_setting,
        Site::Profiles {
            api: Arc::new(ProfileApi {
                state: reader,
                normalizer: engine.normalizer().clone(),
            }),
            token: config.http.token(),
            metrics,
        },
        limits,
    )?;
    Ok((operations, Some(api)))
}

/// What the accept loop knows of one open connection.
struct Connection {
    /// Set once hyper has read the request head and called the service: from then on the
    /// connection is doing work, not just holding a descriptor.
    head_read: AtomicBool,
    /// Set once the answer is sent and the connection only drains what the client still
    /// sends: it may then be closed to make room, or at shutdown, like an idle one.
    answered: AtomicBool,
    /// Wakes the connection's task to close it.
    evict: tokio::sync::Notify,
}

impl Connection {
    /// Whether closing it now loses no request: it has none yet, or it has answered it.
    fn is_idle(&self) -> bool {
        !self.head_read.load(Ordering::SeqCst) || self.answered.load(Ordering::SeqCst)
    }
}

/// The open connections, oldest first. At the limit, a new connection evicts the oldest idle
/// one (no request head yet, or answered already), so idle or slow clients can never keep a
/// health probe or a real request out; only when every connection is busy with a request does
/// the new one wait in the kernel's backlog.
struct OpenConnections {
    max: usize,
    open: std::sync::Mutex<std::collections::VecDeque<std::sync::Weak<Connection>>>,
    /// Wakes the accept loop when a connection closes.
    closed: tokio::sync::Notify,
}

impl OpenConnections {
    fn count(&self) -> usize {
        let mut open = self.open.lock().expect("connections lock");
        open.retain(|c| c.strong_count() > 0);
        open.len()
    }

    /// Closes the connections that have sent their answer and only drain the client's
    /// input, so that a stopping server does not wait for clients to hang up.
    fn close_answered(&self) {
        let open = self.open.lock().expect("connections lock");
        for connection in open.iter().filter_map(std::sync::Weak::upgrade) {
            if connection.answered.load(Ordering::SeqCst) {
                connection.evict.notify_one();
            }
        }
    }

    /// Makes room for one more connection, evicting the oldest idle one if the limit is
    /// reached; false when every open connection is serving a request.
    fn make_room(&self) -> bool {
        let mut open = self.open.lock().expect("connections lock");
        open.retain(|c| c.strong_count() > 0);
        if open.len() < self.max {
            return true;
        }
        let idle = open
            .iter()
            .position(|c| c.upgrade().is_some_and(|c| c.is_idle()));
        match idle.and_then(|i| open.remove(i)).and_then(|c| c.upgrade()) {
            Some(evicted) => {
                evicted.evict.notify_one();
                true
            }
            None => false,
        }
    }

    fn register(&self) -> Arc<Connection> {
        let connection = Arc::new(Connection {
            head_read: AtomicBool::new(false),
            answered: AtomicBool::new(false),
            evict: tokio::sync::Notify::new(),
        });
        self.open
            .lock()
            .expect("connections lock")
            .push_back(Arc::downgrade(&connection));
        connection
    }
}

async fn accept_until_shutdown(
    listener: TcpListener,
    site: Arc<Site>,
    limits: Limits,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let connections = Arc::new(OpenConnections {
        max: limits.max_connections.max(1),
        open: Default::default(),
        closed: tokio::sync::Notify::new(),
    });
    loop {
        // Every connection is busy with a request: leave new ones in the backlog meanwhile.
        while !connections.make_room() {
            tokio::select! {
                _ = stopping.wait_for(|stop| *stop) => break,
                _ = connections.closed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let accepted = tokio::select! {
            _ = stopping.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors, for one: retrying at once would spin a core.
                tracing::warn!(%error, "http accept failed; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let connection = connections.register();
        let connections = Arc::clone(&connections);
        let site = Arc::clone(&site);
        tokio::spawn(async move {
            serve_connection(stream, site, limits, &connection).await;
            drop(connection);
            connections.closed.notify_one();
        });
    }
    // Stop listening at once, then give the exchanges under way their deadline to finish.
    drop(listener);
    let deadline = tokio::time::Instant::now() + limits.request_timeout;
    while connections.count() > 0 && tokio::time::Instant::now() < deadline {
        connections.close_answered();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn serve_connection(
    mut stream: tokio::net::TcpStream,
    site: Arc<Site>,
    limits: Limits,
    connection: &Arc<Connection>,
) {
    let deadline = tokio::time::Instant::now() + limits.request_timeout;
    let seen = Arc::clone(connection);
    let service = hyper::service::service_fn(move |request| {
        seen.head_read.store(true, Ordering::SeqCst);
        let site = Arc::clone(&site);
        async move { Ok::<_, Infallible>(handle(site, request).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(false);
    // hyper borrows the socket so that it is still ours for the lingering close below.
    let exchange = builder.serve_connection(hyper_util::rt::TokioIo::new(&mut stream), service);
    tokio::select! {
        _ = tokio::time::timeout_at(deadline, exchange) => {}
        _ = connection.evict.notified() => return,
    }
    connection.answered.store(true, Ordering::SeqCst);
    let linger_until = deadline.min(tokio::time::Instant::now() + MAX_LINGER);
    tokio::select! {
        _ = tokio::time::timeout_at(linger_until, discard_until_closed(&mut stream)) => {}
        _ = connection.evict.notified() => {}
    }
}

/// The longest a connection stays open after its answer, reading what the client still sends.
const MAX_LINGER: Duration = Duration::from_secs(2);

/// Closes our side of `stream` and reads and drops whatever the client still sends until it
/// closes its side.
///
/// A server that closes a socket with unread input makes the kernel send a reset, and the
/// client then loses the answer (a 431 for an oversized head, say) or fails its own write
/// before reading it. Draining first, as nginx's lingering close does, lets the answer
/// arrive; the caller bounds how long this may take.
async fn discard_until_closed(stream: &mut tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // hyper has usually shut down our side already; a second shutdown fails harmlessly.
    let _ = stream.shutdown().await;
    let mut discarded = [0u8; 8 * 1024];
    while let Ok(read) = stream.read(&mut discarded).await {
        if read == 0 {
            break;
        }
    }
}

async fn handle(
    site: Arc<Site>,
    request: hyper::Request<Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let method = request.method().as_str().to_owned();
    let target = request
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |target| target.as_str().to_owned());
    let authorization = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    // State reads block on RocksDB; keep them off the thread that accepts connections.
    let routed = Arc::clone(&site);
    let response = tokio::task::spawn_blocking(move || {
        route(&routed, &method, &target, authorization.as_deref())
    })
    .await
    .unwrap_or_else(|_| Response::error(500, "the request handler failed"));
    let status = response.status;
    site.metrics().count_http_request(site.name(), status);
    let mut answer = hyper::Response::new(Full::new(Bytes::from(response.body)));
    *answer.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    answer.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(response.content_type),
    );
    if status == 401 {
        answer
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    answer
}

/// Answers one request; `target` is the request target (path and query), `authorization`
/// the request's `Authorization` header.
pub fn route(site: &Site, method: &str, target: &str, authorization: Option<&str>) -> Response {
    if method != "GET" {
        return Response::error(405, &format!("method {method} is not supported; use GET"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match site {
        Site::Operations { metrics, ready } => match path {
            "/metrics" => Response {
                status: 200,
                content_type: "text/plain; version=0.0.4",
                body: metrics.render(),
            },
            "/healthz" => Response::text(200, "ok"),
            "/readyz" if ready.load(Ordering::SeqCst) => Response::text(200, "ready"),
            "/readyz" => Response::text(503, "not ready"),
            _ if path.starts_with("/v1/") => Response::error(
                404,
                "the profile API is served on its own address, http.api_listen",
            ),
            _ => no_endpoint(),
        },
        Site::Profiles { api, token, .. } => {
            if let Some(token) = token {
                if !bearer_matches(authorization, token) {
                    return Response::error(
                        401,
                        "give the API token: Authorization: Bearer <token>",
                    );
                }
            }
            if path.starts_with("/v1/") {
                api.route(path, query)
            } else {
                no_endpoint()
            }
        }
    }
}

/// The answer to an unknown path, which it does not repeat: a path may hold an identifier.
fn no_endpoint() -> Response {
    Response::error(
        404,
        "no such endpoint; see /metrics, /healthz, /readyz or /v1/profiles/{customer_id}",
    )
}

/// Whether `authorization` is `Bearer <token>`, compared in time that does not depend on
/// where the first difference is.
fn bearer_matches(authorization: Option<&str>, token: &str) -> bool {
    let Some(given) = authorization.and_then(|header| header.strip_prefix("Bearer ")) else {
        return false;
    };
    let (given, token) = (given.trim().as_bytes(), token.as_bytes());
    given.len() == token.len()
        && given
            .iter()
            .zip(token)
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
}

impl ProfileApi {
    fn route(&self, path: &str, query: &str) -> Response {
        let result = if path == "/v1/lookup" {
            self.lookup(query)
        } else if let Some(rest) = path.strip_prefix("/v1/profiles/") {
            match rest.strip_suffix("/explain") {
                Some(id) => self.explain(&decode_segment(id)),
                None => self.profile(&decode_segment(rest)),
            }
        } else {
            Ok(no_endpoint())
        };
        result.unwrap_or_else(|error| {
            // The error may name a stored key, an identifier value: it goes to the log only.
            tracing::error!(%error, path, "profile API read failed");
            Response::error(
                500,
                "cannot read the state; the server's log has the details",
            )
        })
    }

    fn profile(&self, customer_id: &str) -> Result<Response> {
        if customer_id.is_empty() || customer_id.contains('/') {
            return Ok(Response::error(404, "give /v1/profiles/{customer_id}"));
        }
        profile_response(&self.state, customer_id)
    }

    fn lookup(&self, query: &str) -> Result<Response> {
        let mut kind = None;
        let mut value = None;
        for (key, text) in form_urlencoded::parse(query.as_bytes()) {
            match key.as_ref() {
                "kind" => kind = Some(text.into_owned()),
                "value" => value = Some(text.into_owned()),
                _ => {}
            }
        }
        let (Some(kind), Some(value)) = (kind, value) else {
            return Ok(Response::error(
                400,
                "give both query parameters: /v1/lookup?kind=email&value=...",
            ));
        };
        match customer_for_identifier(&self.state, &self.normalizer, &kind, &value)? {
            Some(customer_id) => profile_response(&self.state, &customer_id),
            None => Ok(Response::error(404, "no profile holds that identifier")),
        }
    }

    fn explain(&self, customer_id: &str) -> Result<Response> {
        match explain(&self.state, customer_id)? {
            Some(explanation) => Ok(Response::json(200, &explanation)),
            None => Ok(Response::error(
                404,
                &format!("no profile with customer id {customer_id:?}"),
            )),
        }
    }
}

fn profile_response<S: StateRead>(state: &S, customer_id: &str) -> Result<Response> {
    let Some(found) = profile_by_id(state, customer_id)? else {
        return Ok(Response::error(
            404,
            &format!("no profile with customer id {customer_id:?}"),
        ));
    };
    let live = found.profile.customer_id.as_str();
    Ok(Response::json(
        200,
        &ProfileResponse {
            schema_version: SCHEMA_VERSION,
            customer_id: live,
            redirected_from: (live != customer_id).then_some(customer_id),
            profile: &found.profile,
        },
    ))
}

/// Percent-decodes one path segment (customer ids are plain, but clients may escape them).
fn decode_segment(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}
