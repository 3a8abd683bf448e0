//! Where the agent's log goes: stderr, one `write` per line as before, except that a line the
//! reader of a pipe is not taking (the pipe is full) is dropped and counted instead of
//! blocking the thread that logged it. Most lines — the access log — are written by the
//! data-path threads: a container runtime whose log reader stalls (a rotation, a busy shim)
//! would otherwise stall every connection those threads carry once the pipe's 64 KiB are full.
//! Written here rather than taken from `tracing-appender`'s non-blocking writer because that
//! one adds a thread and a wake-up of it per line; this keeps the single `write` per line and
//! its cost.
//!
//! The non-blocking mode itself is set once at start, only when stderr is a pipe
//! ([`ambit_common::sys::nonblocking_if_pipe`]); on a file or a terminal writes block as
//! before (a file does not fill up behind a reader).

use std::io::{self, Write};
use std::sync::LazyLock;

use prometheus_client::metrics::counter::Counter;
use tracing_subscriber::fmt::MakeWriter;

/// Lines dropped because stderr's reader was not taking them (`ambit_log_lines_dropped_total`).
pub static DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);

/// The agent's log writer (a [`MakeWriter`] for the fmt layers).
#[derive(Clone, Copy, Debug, Default)]
pub struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { dropped: false }
    }
}

/// One event's line (the fmt layer formats a line, then writes it with one `write_all`).
pub struct Line {
    /// This line is being dropped: the rest of it goes too.
    dropped: bool,
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.dropped {
            return Ok(buf.len());
        }
        match io::stderr().write(buf) {
            // A pipe takes a write of up to 4 KiB (PIPE_BUF) whole or not at all; only a longer
            // line can be cut short, and then its rest is dropped with it.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.dropped = true;
                DROPPED.inc();
                Ok(buf.len())
            }
            r => r,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match io::stderr().flush() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            r => r,
        }
    }
}
