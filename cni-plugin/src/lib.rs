//! `ambit-cni`: a chained CNI plugin.
//!
//! Layout:
//! - [`config`]: parse-then-validate of the CNI_* environment and the stdin configuration.
//! - [`error`]: the CNI error object and the codes (the only place that knows them).
//! - [`logger`]: a `log` backend writing to a file and/or stderr — never stdout, which carries
//!   the result.
//! - this file: the commands.
//!
//! ADD order, chosen so that no window exists in which pod traffic leaves uncaptured: the
//! redirect rules go in first (with no listener yet, captured connections are refused — fail
//! closed), then the namespace is handed to the agent, and ADD returns only after the agent
//! acknowledges that the pod's listeners are bound. A failed ADD means the runtime does not
//! start the pod; what the ADD installed is removed again, so nothing is left behind.

#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod logger;

use std::path::Path;

use ambit_common::enrollment::Answer;
use ambit_common::netns::Netns;
use ambit_common::nft::NftSocket;
use ambit_common::protocol::{self, Detail, PodInfo, Request, Response};
use ambit_common::redirect::{self, RuleSet};
use ambit_common::route::RouteCtl;
use log::{debug, info, warn};
use serde_json::{Value, json};

use config::{CniEnv, Command, Enrollment, NetConf, PodArgs, SUPPORTED_VERSIONS};
use error::{CniError, code};

/// Runs one CNI command. `Ok(Some(json))` is printed on stdout; an error is printed by `main`
/// as a CNI error object.
pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<String>, CniError> {
    let command = env.command()?;
    if command == Command::Version {
        return Ok(Some(version(stdin)));
    }
    let conf = NetConf::parse(stdin)?;
    logger::init(&conf);
    let v = conf.cni_version.clone();
    let out = match command {
        Command::Add => add(env, &conf),
        Command::Del => del(env, &conf).map(|()| None),
        Command::Check => check(env, &conf).map(|()| None),
        Command::Status => status(&conf).map(|()| None),
        Command::Gc => gc(&conf).map(|()| None),
        Command::Version => unreachable!("answered above"),
    };
    if let Err(e) = &out {
        warn!("{command:?} failed: {} ({}): {}", e.msg, e.code, e.details);
    }
    out.map_err(|e| e.in_version(&v))
}

/// VERSION: answered at once, without side effects (podman calls it on every command).
fn version(stdin: &[u8]) -> String {
    let requested = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".to_string());
    json!({"cniVersion": requested, "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}

fn requires_version(conf: &NetConf, min: &str, what: &str) -> Result<(), CniError> {
    let idx = |v: &str| SUPPORTED_VERSIONS.iter().position(|s| *s == v);
    if idx(&conf.cni_version) < idx(min) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("{what} is not defined for cniVersion {}", conf.cni_version),
            format!("{what} needs cniVersion {min} or later"),
        ));
    }
    Ok(())
}

/// What ADD/CHECK decide about a pod before touching anything.
struct Target {
    pod: PodInfo,
    netns: Option<Netns>,
}

fn target(env: &CniEnv, conf: &NetConf) -> Result<Result<Target, &'static str>, CniError> {
    let container_id = env.container_id()?;
    let ifname = env.ifname()?;
    let netns_path = env.netns().ok_or_else(|| {
        CniError::new(
            code::INVALID_ENV,
            "CNI_NETNS is not set",
            "ADD and CHECK need the pod's network namespace path in CNI_NETNS",
        )
    })?;
    let args = env.args()?;
    let pod_args = PodArgs::from_args(&args);
    let ips = conf.prev_result_ips()?;
    let annotations = conf.pod_annotations();
    match config::enrollment(conf, &pod_args, &annotations) {
        Enrollment::Skip(why) => return Ok(Err(why)),
        Enrollment::Capture(why) => debug!("capturing {container_id}: {why}"),
        Enrollment::Undecided => {
            if let Err(why) = ask_enrollment(conf, &pod_args)? {
                return Ok(Err(why));
            }
        }
    }
    let netns = Netns::open(Path::new(netns_path)).map_err(|e| {
        CniError::new(
            code::INVALID_ENV,
            "CNI_NETNS is not a usable network namespace",
            format!("CNI_NETNS={netns_path:?}: {e}"),
        )
    })?;
    let own = Netns::current_thread().map_err(|e| {
        CniError::new(
            code::IO_FAILURE,
            "cannot read the plugin's own namespace",
            e.to_string(),
        )
    })?;
    if own.id() == netns.id() {
        return Ok(Err(
            "host-network pod: it has no network namespace of its own",
        ));
    }
    let name = pod_args
        .name
        .clone()
        .unwrap_or_else(|| container_id.chars().take(12).collect());
    Ok(Ok(Target {
        pod: PodInfo {
            container_id,
            ifname,
            namespace: pod_args.namespace.unwrap_or_else(|| "default".into()),
            name,
            uid: pod_args.uid.unwrap_or_default(),
            ips,
            annotations,
            netns_path: netns_path.into(),
            rules: None,
        },
        netns: Some(netns),
    }))
}

fn rule_set(conf: &NetConf) -> RuleSet {
    RuleSet {
        probe_v4: conf.probe_v4(),
        probe_v6: conf.probe_v6(),
    }
}

fn rules_error(e: impl std::fmt::Display, ns: &Netns) -> CniError {
    let e = e.to_string();
    // EPERM is a missing capability; anything else names its own cause.
    let hint = if e.contains("Operation not permitted") || e.contains("os error 1)") {
        "; the plugin needs CAP_NET_ADMIN and CAP_SYS_ADMIN"
    } else {
        ""
    };
    CniError::new(
        code::RULES_FAILED,
        "cannot install the redirect rules in the pod's network namespace",
        format!("namespace {}: {e}{hint}", ns.id()),
    )
}

/// Loopback up (the plugin owns the capture, which needs it), the redirect table, the policy
/// routing. On a failure, what was installed is removed again: the ADD fails, the pod does not
/// start, and nothing is left behind for a DEL that may never come.
fn install_rules(conf: &NetConf, ns: &Netns) -> Result<(), CniError> {
    let sock = ns
        .run(NftSocket::open)
        .map_err(|e| rules_error(e, ns))?
        .map_err(|e| rules_error(e, ns))?;
    let routes = RouteCtl::open_in(ns).map_err(|e| rules_error(e, ns))?;
    routes.loopback_up().map_err(|e| rules_error(e, ns))?;
    let installed = rule_set(conf)
        .install(&sock)
        .map_err(|e| rules_error(e, ns))
        .and_then(|()| routes.install().map_err(|e| rules_error(e, ns)));
    if installed.is_err() {
        roll_back(ns);
    }
    installed
}

/// Removes what ADD installed in the pod's namespace (best effort: each failure is logged).
fn roll_back(ns: &Netns) {
    let nft = ns.run(NftSocket::open).ok().and_then(Result::ok);
    if let Some(Err(e)) = nft.as_ref().map(redirect::remove) {
        warn!("rolling back: removing rules in {}: {e}", ns.id());
    }
    if let Err(e) = RouteCtl::open_in(ns).and_then(|r| r.remove()) {
        warn!("rolling back: removing policy routing in {}: {e}", ns.id());
    }
}

fn agent_call(conf: &NetConf, req: &Request, ns: Option<&Netns>) -> Result<Response, CniError> {
    use std::os::fd::AsFd;
    protocol::call(
        &conf.agent_socket,
        req,
        ns.map(|n| n.as_fd()),
        conf.agent_timeout(),
    )
    .map_err(|e| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            "ambit-agent is not reachable",
            format!(
                "{e}; the pod is not started uncaptured: check that ambit-agent runs on this node and listens on {}",
                conf.agent_socket.display()
            ),
        )
    })
}

/// Asks the agent whether the pod's labels enroll it. `Ok(Err(reason))` = not enrolled; an
/// agent that cannot tell (pod not known yet, API server unreachable) fails the ADD, so the
/// runtime retries and the pod never starts uncaptured by mistake.
fn ask_enrollment(conf: &NetConf, pod: &PodArgs) -> Result<Result<(), &'static str>, CniError> {
    let (Some(namespace), Some(name)) = (pod.namespace.clone(), pod.name.clone()) else {
        return Err(CniError::new(
            code::INVALID_ENV,
            "enrollment by labels needs K8S_POD_NAMESPACE and K8S_POD_NAME in CNI_ARGS",
            "the runtime did not say which pod this is",
        ));
    };
    let resp = agent_call(
        conf,
        &Request::Enrollment {
            namespace: namespace.clone(),
            name: name.clone(),
            uid: pod.uid.clone().unwrap_or_default(),
        },
        None,
    )?;
    match (resp.ok, resp.detail) {
        (
            true,
            Some(Detail::Enrollment(Answer {
                capture: true,
                reason,
            })),
        ) => {
            debug!("{namespace}/{name}: enrolled ({reason})");
            Ok(Ok(()))
        }
        (
            true,
            Some(Detail::Enrollment(Answer {
                capture: false,
                reason,
            })),
        ) => {
            info!("{namespace}/{name}: not enrolled ({reason})");
            Ok(Err("not enrolled by its labels or its namespace's"))
        }
        _ => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "ambit-agent cannot tell yet whether the pod is enrolled",
            format!(
                "{namespace}/{name}: {}; the pod is not started until it can",
                resp.error.unwrap_or_else(|| "no answer".into())
            ),
        )),
    }
}

fn add(env: &CniEnv, conf: &NetConf) -> Result<Option<String>, CniError> {
    let target = match target(env, conf)? {
        Ok(t) => t,
        Err(why) => {
            info!(
                "ADD {}: not captured ({why})",
                env.container_id.as_deref().unwrap_or("")
            );
            return Ok(Some(conf.result().to_string()));
        }
    };
    let ns = target.netns.as_ref().expect("target has a namespace");
    install_rules(conf, ns)?;
    let handed = agent_call(
        conf,
        &Request::Add {
            pod: Box::new(PodInfo {
                rules: Some(rule_set(conf)),
                ..target.pod.clone()
            }),
        },
        Some(ns),
    )
    .and_then(|resp| match resp.ok {
        true => Ok(()),
        false => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "ambit-agent refused the pod",
            resp.error.unwrap_or_else(|| "no reason given".into()),
        )),
    });
    if let Err(e) = handed {
        // The ADD fails, so the pod does not start: nothing of it is left running uncaptured.
        roll_back(ns);
        return Err(e);
    }
    info!(
        "ADD {}/{} ({}): captured in {}",
        target.pod.namespace,
        target.pod.name,
        target.pod.container_id,
        ns.id()
    );
    Ok(Some(conf.result().to_string()))
}

/// DEL is best effort and always succeeds once its input parses: a failing DEL would block the
/// primary plugin's cleanup. Whatever cannot be reached now, the agent reconciles later.
fn del(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let container_id = env.container_id()?;
    info!(
        "DEL {container_id}: CNI_NETNS={:?}",
        env.netns().unwrap_or("")
    );
    match agent_call(
        conf,
        &Request::Del {
            container_id: container_id.clone(),
        },
        None,
    ) {
        Ok(r) if !r.ok => warn!("DEL {container_id}: agent: {}", r.error.unwrap_or_default()),
        Ok(_) => {}
        Err(e) => warn!(
            "DEL {container_id}: {}; the agent will reconcile",
            e.details
        ),
    }
    if let Some(path) = env.netns() {
        match Netns::open(Path::new(path)) {
            Ok(ns) => {
                let nft = ns.run(NftSocket::open).ok().and_then(Result::ok);
                if let Some(Err(e)) = nft.as_ref().map(redirect::remove) {
                    warn!("DEL {container_id}: removing rules: {e}");
                }
                if let Err(e) = RouteCtl::open_in(&ns).and_then(|r| r.remove()) {
                    warn!("DEL {container_id}: removing policy routing: {e}");
                }
            }
            Err(e) => debug!("DEL {container_id}: namespace already gone ({e})"),
        }
    }
    Ok(())
}

fn check(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    requires_version(conf, "0.4.0", "CHECK")?;
    let target = match target(env, conf)? {
        Ok(t) => t,
        Err(_) => return Ok(()),
    };
    let ns = target.netns.as_ref().expect("target has a namespace");
    let missing = |e: &dyn std::fmt::Display| {
        CniError::new(
            code::RULES_MISSING,
            "the pod's redirect rules are missing or altered",
            format!("namespace {}: {e}", ns.id()),
        )
    };
    let sock = ns
        .run(NftSocket::open)
        .map_err(|e| missing(&e))?
        .map_err(|e| missing(&e))?;
    rule_set(conf).verify(&sock).map_err(|e| missing(&e))?;
    RouteCtl::open_in(ns)
        .and_then(|r| r.verify())
        .map_err(|e| missing(&e))?;
    let resp = agent_call(
        conf,
        &Request::Check {
            container_id: target.pod.container_id.clone(),
        },
        None,
    )?;
    if !resp.ok {
        return Err(CniError::new(
            code::NOT_SERVED,
            "ambit-agent does not serve this pod",
            resp.error.unwrap_or_default(),
        ));
    }
    Ok(())
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    requires_version(conf, "1.1.0", "STATUS")?;
    let resp = agent_call(conf, &Request::Status, None).map_err(|e| {
        CniError::new(
            code::NOT_AVAILABLE,
            "ambit-agent is not available",
            e.details,
        )
    })?;
    if !resp.ok {
        return Err(CniError::new(
            code::NOT_AVAILABLE,
            "ambit-agent is not ready",
            resp.error.unwrap_or_default(),
        ));
    }
    Ok(())
}

fn gc(conf: &NetConf) -> Result<(), CniError> {
    requires_version(conf, "1.1.0", "GC")?;
    let valid = conf
        .valid_attachments
        .as_ref()
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "GC needs cni.dev/valid-attachments",
                "the runtime must pass the list of valid attachments",
            )
        })?
        .iter()
        .map(|a| a.container_id.clone())
        .collect();
    let resp = agent_call(conf, &Request::Gc { valid }, None)?;
    if !resp.ok {
        return Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "ambit-agent could not garbage-collect",
            resp.error.unwrap_or_default(),
        ));
    }
    if let Some(Detail::Gc { removed }) = resp.detail
        && !removed.is_empty()
    {
        info!("GC released {removed:?}");
    }
    Ok(())
}
