//! Errors for people: one line, each cause once.

/// `e` and its causes on one line, `: `-separated, each cause once: a cause whose text is
/// already in the line (error messages often embed their source's) is not repeated, so a
/// missing file reads "…: No such file or directory (os error 2)", not that twice.
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("{path}: {source}")]
        Embeds {
            path: String,
            source: std::io::Error,
        },
        #[error("loading the CA")]
        Wraps(#[source] std::io::Error),
    }

    #[test]
    fn a_cause_is_said_once() {
        let missing = || std::io::Error::from_raw_os_error(libc::ENOENT);
        let e = Outer::Embeds {
            path: "/ca.pem".into(),
            source: missing(),
        };
        assert_eq!(
            one_line(&e),
            "/ca.pem: No such file or directory (os error 2)"
        );
        assert_eq!(
            one_line(&Outer::Wraps(missing())),
            "loading the CA: No such file or directory (os error 2)"
        );
    }
}
