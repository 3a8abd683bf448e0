//! The one place that knows CNI error codes and the spec versions errors (and results) are
//! reported in.

use serde::Serialize;

/// Spec versions this plugin speaks. STATUS and GC exist from 1.1.0 on.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Codes from the CNI specification, plus Ambit's own (100 and up).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// The redirect rules could not be installed in the pod's namespace.
    pub const RULES_FAILED: u32 = 100;
    /// CHECK found the redirect rules or policy routing missing or altered.
    pub const RULES_MISSING: u32 = 101;
    /// CHECK found that the agent does not serve the pod.
    pub const NOT_SERVED: u32 = 102;
}

/// A CNI error object; printed on stdout (the result channel) by `main`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            cni_version: "1.0.0".into(),
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// Reports the error in the version of the request, when it is known and supported.
    pub fn in_version(mut self, version: &str) -> Self {
        if SUPPORTED_VERSIONS.contains(&version) {
            self.cni_version = version.to_string();
        }
        self
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            format!(
                r#"{{"cniVersion":"1.0.0","code":{},"msg":"error"}}"#,
                self.code
            )
        })
    }
}
