//! An in-process double of the Kubernetes API server, for the Kubernetes source's tests and
//! the benchmark: it answers list requests with the responses it was given, streams the
//! watch events pushed to it, and records PATCH requests. No network: the kube client talks
//! to it as a tower service ([`Double::client`]).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use kube::Client;
use serde_json::{Value, json};
use tokio::sync::mpsc;

pub const PODS: &str = "/api/v1/pods";
pub const NAMESPACES: &str = "/api/v1/namespaces";
pub const SERVICES: &str = "/api/v1/services";
pub const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub const POLICIES: &str = "/apis/security.istio.io/v1/authorizationpolicies";
pub const PEER_AUTHS: &str = "/apis/security.istio.io/v1/peerauthentications";

/// The API server double.
#[derive(Default)]
pub struct Double {
    /// List responses per path: each list takes the next one; the last one repeats.
    pub lists: Mutex<HashMap<String, VecDeque<(u16, Value)>>>,
    /// Open watch streams per path.
    watches: Mutex<HashMap<String, Vec<mpsc::UnboundedSender<Value>>>>,
    /// Every request as "METHOD path?query".
    pub requests: Mutex<Vec<String>>,
    /// PATCH requests: (path, body).
    pub patches: Mutex<Vec<(String, Value)>>,
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: u16, v: &Value) -> http::Response<Body> {
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(
            http_body_util::Full::new(Bytes::from(v.to_string()))
                .map_err(|e| match e {})
                .boxed(),
        )
        .unwrap()
}

impl Double {
    pub fn list(&self, path: &str, status: u16, body: Value) {
        self.lists
            .lock()
            .unwrap()
            .entry(path.into())
            .or_default()
            .push_back((status, body));
    }

    /// Sends a watch event to every open watch of `path`; returns how many got it.
    pub fn event(&self, path: &str, kind: &str, object: Value) -> usize {
        let mut w = self.watches.lock().unwrap();
        let senders = w.entry(path.into()).or_default();
        senders.retain(|s| s.send(json!({"type": kind, "object": object})).is_ok());
        senders.len()
    }

    pub fn watching(&self, path: &str) -> usize {
        self.watches
            .lock()
            .unwrap()
            .get(path)
            .map_or(0, |v| v.iter().filter(|s| !s.is_closed()).count())
    }

    /// List (not watch) requests made for `path`.
    pub fn lists_of(&self, path: &str) -> usize {
        let prefix = format!("GET {path}?");
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.starts_with(&prefix) && !r.contains("watch=true"))
            .count()
    }

    pub fn count(&self, needle: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.contains(needle))
            .count()
    }

    async fn serve(&self, req: http::Request<kube::client::Body>) -> http::Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        self.requests
            .lock()
            .unwrap()
            .push(format!("{method} {path}?{query}"));
        if method == http::Method::PATCH {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let v: Value = serde_json::from_slice(&body).unwrap();
            self.patches.lock().unwrap().push((path, v.clone()));
            return full(
                200,
                &json!({"apiVersion": "v1", "kind": "Pod", "metadata": v["metadata"]}),
            );
        }
        if query.contains("watch=true") {
            let (tx, rx) = mpsc::unbounded_channel::<Value>();
            self.watches
                .lock()
                .unwrap()
                .entry(path)
                .or_default()
                .push(tx);
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                let v = rx.recv().await?;
                let line = Bytes::from(format!("{v}\n"));
                Some((Ok::<_, Infallible>(Frame::data(line)), rx))
            });
            return http::Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap();
        }
        let mut lists = self.lists.lock().unwrap();
        let Some(q) = lists.get_mut(&path) else {
            return full(
                404,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "reason": "NotFound", "message": "the server could not find the requested resource", "code": 404}),
            );
        };
        let (status, body) = if q.len() > 1 {
            q.pop_front().unwrap()
        } else {
            q.front().cloned().unwrap()
        };
        full(status, &body)
    }
}

impl Double {
    /// A kube client whose API server is this double.
    pub fn client(self: &Arc<Self>) -> Client {
        let double = self.clone();
        let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let d = double.clone();
            async move { Ok::<_, Infallible>(d.serve(req).await) }
        });
        Client::new(svc, "default")
    }
}
