//! `ambit-install`: puts `ambit-cni` on a node and keeps it chained into the pod network.
//!
//! - [`cniconf`]: how runtimes choose the pod network, and the edits we make to it (pure).
//! - [`files`]: atomic writes and copies.
//! - [`install`]: install / check / uninstall, each idempotent.
//! - [`watch`]: the resident loop (inotify + resync, fight back-off, signals).
//! - [`cluster`]: on exit, uninstall or keep (asks the API server about the DaemonSet).

#![forbid(unsafe_code)]

pub mod cluster;
pub mod cniconf;
pub mod files;
pub mod install;
pub mod watch;
