//! Entry point: read CNI_* and stdin, run, print the result or the error object on stdout.

#![forbid(unsafe_code)]

use std::io::{Read, Write};

/// A network configuration larger than this is refused rather than buffered.
const MAX_STDIN: u64 = 4 * 1024 * 1024;

fn main() {
    let vars: Vec<(String, String)> = std::env::vars().collect();
    let env =
        ambit_cni::config::CniEnv::from_vars(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(MAX_STDIN).read_to_end(&mut stdin);
    let result = match read {
        Ok(_) => ambit_cni::run(&env, &stdin),
        Err(e) => Err(ambit_cni::error::CniError::new(
            ambit_cni::error::code::IO_FAILURE,
            "cannot read stdin",
            e.to_string(),
        )),
    };
    let mut out = std::io::stdout().lock();
    match result {
        Ok(Some(json)) => {
            let _ = out.write_all(json.as_bytes());
            let _ = out.flush();
        }
        Ok(None) => {}
        Err(e) => {
            let _ = out.write_all(e.to_json().as_bytes());
            let _ = out.flush();
            std::process::exit(1);
        }
    }
}
