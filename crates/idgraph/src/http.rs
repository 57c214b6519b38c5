//! The HTTP endpoints of SPEC §6: `GET /metrics` (Prometheus text format), `GET /healthz`
//! (the process is up), `GET /readyz` (it is consuming and its outputs are being
//! acknowledged), and the profile API read from the committed state:
//!
//! - `GET /v1/profiles/{customer_id}`: the live profile, following merge redirects;
//! - `GET /v1/lookup?kind=email&value=...`: the profile holding an identifier (the value is
//!   normalized the way events are);
//! - `GET /v1/profiles/{customer_id}/explain`: why the members of the profile are linked.
//!
//! The API reads through a [`RocksReader`], so it sees each batch's write whole once it is
//! committed and never waits for the worker. Every answer is JSON; errors are
//! `{"error": "..."}` with a 4xx status.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use idgraph_engine::read::{customer_for_identifier, explain, profile_by_id};
use idgraph_engine::{Normalizer, StateRead};
use idgraph_kafka::Metrics;
use idgraph_model::{Profile, SCHEMA_VERSION};
use idgraph_store_rocksdb::RocksReader;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the server answers from.
pub struct Endpoints {
    pub metrics: Metrics,
    pub ready: Arc<AtomicBool>,
    /// The profile API; without it, `/v1/...` answers 404 with a reason.
    pub profiles: Option<ProfileApi>,
}

/// Read access to the state, and the normalizer that turns a looked-up value into the form
/// the graph stores.
pub struct ProfileApi {
    pub state: RocksReader,
    pub normalizer: Normalizer,
}

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

    fn reason(&self) -> &'static str {
        match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "Unknown",
        }
    }
}

/// Binds `listen` and serves on a thread of its own; returns the bound address (useful with
/// port 0).
pub fn serve(listen: &str, endpoints: Endpoints) -> Result<SocketAddr> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the http runtime")?;
    let listener = runtime
        .block_on(TcpListener::bind(listen))
        .with_context(|| format!("cannot listen on http.listen = {listen:?}"))?;
    let address = listener.local_addr()?;
    let endpoints = Arc::new(endpoints);
    std::thread::spawn(move || {
        runtime.block_on(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let endpoints = Arc::clone(&endpoints);
                tokio::spawn(async move {
                    let _ = respond(stream, endpoints).await;
                });
            }
        })
    });
    Ok(address)
}

async fn respond(mut stream: tokio::net::TcpStream, endpoints: Arc<Endpoints>) -> Result<()> {
    // Read until the end of the request head (a request line can arrive in pieces).
    let mut request = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        request.extend_from_slice(&chunk[..read]);
    }
    let head = String::from_utf8_lossy(&request).into_owned();
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or("").to_owned();
    let target = words.next().unwrap_or("/").to_owned();
    // State reads block on RocksDB; keep them off the thread that accepts connections.
    let response = tokio::task::spawn_blocking(move || route(&method, &target, &endpoints))
        .await
        .unwrap_or_else(|_| Response::error(500, "the request handler failed"));
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        response.status,
        response.reason(),
        response.content_type,
        response.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(response.body.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

/// Answers one request; `target` is the request target (path and query).
pub fn route(method: &str, target: &str, endpoints: &Endpoints) -> Response {
    if method != "GET" {
        return Response::error(405, &format!("method {method} is not supported; use GET"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match path {
        "/metrics" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: endpoints.metrics.render(),
        },
        "/healthz" => Response::text(200, "ok"),
        "/readyz" if endpoints.ready.load(Ordering::SeqCst) => Response::text(200, "ready"),
        "/readyz" => Response::text(503, "not ready"),
        _ if path.starts_with("/v1/") => match &endpoints.profiles {
            Some(api) => api.route(path, query),
            None => Response::error(404, "this process serves no profile API"),
        },
        _ => Response::error(404, &format!("no endpoint at {path}")),
    }
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
            Ok(Response::error(404, &format!("no endpoint at {path}")))
        };
        result.unwrap_or_else(|error| {
            tracing::error!(%error, path, "profile API read failed");
            Response::error(500, &format!("cannot read the state: {error}"))
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
            None => Ok(Response::error(
                404,
                &format!("no profile holds identifier kind {kind:?} with that value"),
            )),
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
