//! The agent's HTTP endpoints (hyper, HTTP/1.1):
//! - metrics (`--metrics-address`, default `0.0.0.0:15020`): `/metrics`, `/stats/prometheus`
//!   (OpenMetrics when the `Accept` header asks for it, else the Prometheus text format);
//! - readiness (`--readiness-address`, default `0.0.0.0:15021`): `/healthz/ready`;
//! - admin (`--admin-address`, loopback only, default `127.0.0.1:15000`): `/config_dump`
//!   (pods, identities, certificate metadata — never keys —, policies with their status,
//!   Services with their VIPs and endpoints, the effective configuration) and `/logging` (GET shows the filter, `?level=<filter>` sets it).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::certs::CertManager;
use crate::store::Store;
use crate::workloads::Manager;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({what}): {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub what: &'static str,
    pub source: std::io::Error,
}

/// Changes the log filter at run time; returns the filter now in force.
pub type LogControl = Arc<dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync>;

/// What the endpoints read.
pub struct Admin {
    pub mgr: Arc<Manager>,
    pub store: Arc<Store>,
    pub certs: Arc<CertManager>,
    pub registry: Registry,
    pub config: serde_json::Value,
    pub log: LogControl,
}

type Resp = Response<Full<Bytes>>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn json(v: &serde_json::Value) -> Resp {
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec_pretty(v).unwrap_or_default(),
        )))
        .expect("static response parts are valid")
}

fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Admin {
    /// OpenMetrics when the scraper asks for it (Prometheus does), else the Prometheus text
    /// format (0.0.4).
    fn metrics(&self, req: &Request<Incoming>) -> Resp {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding: {e}\n"),
            );
        }
        let openmetrics = req
            .headers()
            .get_all(http::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("application/openmetrics-text"));
        let (body, content_type) = if openmetrics {
            (
                out,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        } else {
            (
                crate::metrics::openmetrics_to_text(&out),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        };
        Response::builder()
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    }

    /// Ready when every known pod is served and each local identity has its certificate.
    fn ready(&self) -> Resp {
        let mut why = self.mgr.readiness().err().unwrap_or_default();
        let held: Vec<_> = self.certs.list().into_iter().map(|c| c.identity).collect();
        for id in self.store.local_identities() {
            if !held.contains(&id) {
                why.push(format!("no certificate yet for {id}"));
            }
        }
        if why.is_empty() {
            text(StatusCode::OK, "ready\n")
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready:\n{}\n", why.join("\n")),
            )
        }
    }

    fn config_dump(&self) -> Resp {
        let certs: Vec<_> = self
            .certs
            .list()
            .into_iter()
            .map(|c| {
                serde_json::json!({
                    "identity": c.identity.to_string(),
                    "serial": c.serial,
                    "notAfter": rfc3339(c.not_after),
                    "expiresInSeconds": c.not_after
                        .duration_since(std::time::SystemTime::now())
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                })
            })
            .collect();
        let policies: Vec<_> = self
            .store
            .policy_statuses()
            .into_iter()
            .map(|s| {
                serde_json::json!({
                    "kind": s.kind,
                    "name": s.key,
                    "state": format!("{:?}", s.state),
                    "messages": s.messages,
                })
            })
            .collect();
        let (pods, namespaces) = self.store.counts();
        let (services, endpoints) = self.store.service_counts();
        json(&serde_json::json!({
            "pods": self.mgr.dump(),
            "services": self.store.services_dump(),
            "certificates": certs,
            "ca": self.certs.ca_description(),
            "policies": policies,
            "store": {"pods": pods, "namespaces": namespaces, "services": services, "endpoints": endpoints},
            "config": self.config,
            "generatedAt": rfc3339(std::time::SystemTime::now()),
        }))
    }

    fn logging(&self, req: &Request<Incoming>) -> Resp {
        let level = req.uri().query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("level="))
                .map(|v| v.replace("%2C", ",").replace("%3D", "="))
        });
        if level.is_some() && req.method() != Method::POST && req.method() != Method::PUT {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "use POST /logging?level=<filter>\n",
            );
        }
        match (self.log)(level.as_deref()) {
            Ok(now) => {
                if level.is_some() {
                    info!(filter = %now, "log filter changed through the admin endpoint");
                }
                text(StatusCode::OK, format!("{now}\n"))
            }
            Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        }
    }
}

#[derive(Clone, Copy)]
pub enum Endpoint {
    Metrics,
    Readiness,
    Admin,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Metrics => "metrics",
            Endpoint::Readiness => "readiness",
            Endpoint::Admin => "admin",
        }
    }
}

fn route(admin: &Admin, which: Endpoint, req: &Request<Incoming>) -> Resp {
    match (which, req.uri().path()) {
        (Endpoint::Metrics, "/metrics" | "/stats/prometheus") => admin.metrics(req),
        (Endpoint::Readiness, "/healthz/ready") => admin.ready(),
        (Endpoint::Admin, "/config_dump") => admin.config_dump(),
        (Endpoint::Admin, "/logging") => admin.logging(req),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

pub async fn bind(addr: SocketAddr, which: Endpoint) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError {
        addr,
        what: which.name(),
        source,
    })
}

/// Serves one endpoint until `stop`.
pub async fn serve(
    listener: TcpListener,
    which: Endpoint,
    admin: Arc<Admin>,
    stop: CancellationToken,
) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(endpoint = which.name(), "accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let resp = route(&admin, which, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}
