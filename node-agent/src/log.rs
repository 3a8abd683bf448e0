//! Where the agent's log goes: stderr, written so that logging never waits for the reader and
//! costs the data path as little as it can.
//!
//! - A line the reader of a pipe is not taking (the pipe is full) is dropped and counted
//!   instead of blocking the thread that logged it. Most lines — the access log — are written
//!   by the data-path threads: a container runtime whose log reader stalls (a rotation, a busy
//!   shim) would otherwise stall every connection those threads carry once the pipe's 64 KiB
//!   are full. The non-blocking mode itself is set once at start, only when stderr is a pipe
//!   ([`ambit_common::sys::nonblocking_if_pipe`]); on a file or a terminal writes block as
//!   before (a file does not fill up behind a reader).
//! - A data-path thread batches its lines ([`idle`]): it writes them when it runs out of work
//!   and is about to sleep, when [`BATCH_MAX`] bytes are waiting, or when the oldest has waited
//!   [`BATCH_DELAY`] — one `write` for many lines instead of one per line, off the path of the
//!   connection that logged them when the thread has nothing else to do. The write of one
//!   access line was about 5 µs of a new connection on a single vCPU (ARCHITECTURE.md). A batch
//!   is at most `PIPE_BUF` bytes, so a full pipe still takes or drops whole lines. Every other
//!   thread writes each line at once, as one `write`.
//!
//! Written here rather than taken from `tracing-appender`'s non-blocking writer because that
//! one hands every line to a thread of its own (a copy, a channel send and a wake-up of that
//! thread per line), and keeps lines in an unbounded or blocking queue rather than dropping
//! them at the pipe.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io::{self, Write};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use ambit_proxy::access;
use ambit_proxy::workers::Hooks;
use prometheus_client::metrics::counter::Counter;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FormatFields, MakeWriter};

/// Lines dropped because stderr's reader was not taking them (`ambit_log_lines_dropped_total`).
pub static DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);

/// The most a thread batches: `PIPE_BUF` on Linux, the largest write a pipe takes whole or not
/// at all. A longer line is written alone, at once.
pub const BATCH_MAX: usize = 4096;

/// The longest a batched line waits while its thread keeps working; with the access lines'
/// own wait (`ambit_proxy::access::DEFER_DELAY`, also 50 ms) a line is out within 0.1 s of
/// its connection's end (Envoy flushes its access log every second; a tenth of that keeps
/// `kubectl logs -f` current).
pub const BATCH_DELAY: Duration = Duration::from_millis(50);

/// The hooks of the data-path workers: they keep their access lines
/// ([`ambit_proxy::access`]) and batch their log lines (here), and write both when they run
/// out of work and are about to sleep.
pub const WORKER_HOOKS: Hooks = Hooks {
    started: Some(access::defer_on_this_thread),
    idle: Some(worker_idle),
    ended: Some(access::stop_deferring),
};

/// A worker ran out of work: its access lines first (they go into its log batch), then the
/// batch.
fn worker_idle(sleeps: bool) {
    access::idle(sleeps);
    idle(sleeps);
}

thread_local! {
    /// The lines of a thread that batches ([`idle`] has been called on it).
    static BATCH: RefCell<ThreadBatch> = const { RefCell::new(ThreadBatch(None)) };
}

/// A data-path worker ran out of work ([`WORKER_HOOKS`]): from the first call on a thread,
/// the thread batches its lines; it writes them now if it is about to sleep (`sleeps`) or the
/// oldest has waited [`BATCH_DELAY`].
fn idle(sleeps: bool) {
    let _ = BATCH.try_with(|b| {
        let Ok(mut b) = b.try_borrow_mut() else {
            return;
        };
        match &mut b.0 {
            Some(batch) => {
                DROPPED.inc_by(batch.idle(sleeps, &mut io::stderr()));
            }
            None => b.0 = Some(Batch::default()),
        }
    });
}

/// A thread's batch, written when the thread ends.
struct ThreadBatch(Option<Batch>);

impl Drop for ThreadBatch {
    fn drop(&mut self) {
        if let Some(b) = &mut self.0 {
            DROPPED.inc_by(b.write(&mut io::stderr()));
        }
    }
}

/// Lines logged and not yet written.
#[derive(Default)]
struct Batch {
    /// Whole lines, at most [`BATCH_MAX`] bytes.
    buf: Vec<u8>,
    /// When the oldest line in `buf` came.
    since: Option<Instant>,
}

impl Batch {
    /// Adds `line`, writing to `out` first what would not fit or has waited too long (and a
    /// line too long to batch at once, after the rest); returns the lines dropped.
    fn push(&mut self, line: &[u8], out: &mut impl Write) -> u64 {
        let mut dropped = 0;
        if self.buf.len() + line.len() > BATCH_MAX || self.overdue() {
            dropped += self.write(out);
        }
        if line.len() > BATCH_MAX {
            return dropped + write_lines(line, out);
        }
        if self.buf.is_empty() {
            self.buf.reserve_exact(BATCH_MAX);
            self.since = Some(Instant::now());
        }
        self.buf.extend_from_slice(line);
        dropped
    }

    /// The thread ran out of work: writes the batch if it sleeps or the batch is overdue.
    fn idle(&mut self, sleeps: bool, out: &mut impl Write) -> u64 {
        if sleeps || self.overdue() {
            self.write(out)
        } else {
            0
        }
    }

    fn overdue(&self) -> bool {
        self.since.is_some_and(|t| t.elapsed() >= BATCH_DELAY)
    }

    /// Writes the batch in one `write`; returns the lines dropped.
    fn write(&mut self, out: &mut impl Write) -> u64 {
        let dropped = write_lines(&self.buf, out);
        self.buf.clear();
        self.since = None;
        dropped
    }
}

/// Writes `bytes` (whole lines) to `out`, dropping what a full pipe does not take; returns the
/// number of lines dropped that way. Another error (stderr closed) loses the rest uncounted,
/// as the fmt layer ignores a writer's errors.
fn write_lines(bytes: &[u8], out: &mut impl Write) -> u64 {
    let mut done = 0;
    while done < bytes.len() {
        match out.write(&bytes[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // A line cut short (only one longer than PIPE_BUF can be) counts as dropped.
                return bytes[done..].iter().filter(|&&b| b == b'\n').count() as u64;
            }
            Err(_) => break,
        }
    }
    0
}

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
        let batched = BATCH.try_with(|b| {
            let mut b = b.try_borrow_mut().ok()?;
            let batch = b.0.as_mut()?;
            Some(batch.push(buf, &mut io::stderr()))
        });
        if let Ok(Some(dropped)) = batched {
            DROPPED.inc_by(dropped);
            return Ok(buf.len());
        }
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

    /// Writes what this thread has batched.
    fn flush(&mut self) -> io::Result<()> {
        let _ = BATCH.try_with(|b| {
            if let Ok(mut b) = b.try_borrow_mut()
                && let Some(batch) = &mut b.0
            {
                DROPPED.inc_by(batch.write(&mut io::stderr()));
            }
        });
        match io::stderr().flush() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            r => r,
        }
    }
}

/// The fields of a plain line (`--log-format plain` without a terminal), written byte for byte
/// as tracing-subscriber's default field formatter writes them, with less machinery: its
/// visitor formats every field through `write!("{}{}{:?}")` with two (empty, when not a
/// terminal) ANSI styles around the name, and every integer through `fmt`. On the data path
/// that is most of an access line's cost, and the access line was the largest user-space
/// cost of a new connection (~22,000 instructions per line per agent, callgrind, 2026-12-05);
/// tracing-subscriber has no cheaper formatter with the same output, and the output is what
/// operators' parsers read (docs/operations.md). With ANSI on, the default formatter writes.
/// `log::tests::plain_fields_write_what_the_default_formatter_writes` holds the two equal.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainFields;

impl<'w> FormatFields<'w> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return DefaultFields::new().format_fields(writer, fields);
        }
        let sanitize = writer.sanitizes_ansi_escapes();
        let mut v = PlainVisitor {
            writer,
            sanitize,
            empty: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

/// RFC 3339 UTC time with microseconds, as tracing-subscriber's `SystemTime` timer writes it,
/// formatted by humantime into one buffer (the timer formats seven integers through `fmt`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Clock;

impl FormatTime for Clock {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let now = std::time::SystemTime::now();
        match now.duration_since(std::time::UNIX_EPOCH) {
            // Up to the end of year 9999, humantime's range.
            Ok(d) if d.as_secs() < 253_402_300_800 => {
                write!(w, "{}", humantime::format_rfc3339_micros(now))
            }
            // A clock set before 1970 (humantime would panic) or past 9999.
            _ => tracing_subscriber::fmt::time::SystemTime.format_time(w),
        }
    }
}

struct PlainVisitor<'a> {
    writer: Writer<'a>,
    /// Escape control characters in the message, as the default formatter does.
    sanitize: bool,
    /// No field written yet (no separating space before the next).
    empty: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// Writes a field other than the message: `name=` and then what `value` writes. Fields of
    /// `log` records' metadata (`log.*`) are not written; a raw identifier loses its `r#`.
    fn field(&mut self, name: &str, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = self
            .pad()
            .and_then(|()| self.writer.write_str(name))
            .and_then(|()| self.writer.write_char('='))
            .and_then(|()| value(&mut self.writer));
    }

    fn pad(&mut self) -> fmt::Result {
        if std::mem::replace(&mut self.empty, false) {
            Ok(())
        } else {
            self.writer.write_char(' ')
        }
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            return self.record_debug(field, &format_args!("{value}"));
        }
        // `{:?}` of a string changes nothing but the quotes when every byte is printable
        // ASCII other than `"` and `\`.
        if value
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
        {
            self.field(field.name(), |w| {
                w.write_char('"')?;
                w.write_str(value)?;
                w.write_char('"')
            });
        } else {
            self.field(field.name(), |w| write!(w, "{value:?}"));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "message" {
            return self.record_debug(field, &value);
        }
        self.field(field.name(), |w| {
            w.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "message" {
            return self.record_debug(field, &value);
        }
        self.field(field.name(), |w| {
            w.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if field.name() == "message" {
            return self.record_debug(field, &value);
        }
        self.field(field.name(), |w| {
            w.write_str(if value { "true" } else { "false" })
        });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let sanitize = self.sanitize;
        let shown = format_args!("{value}");
        match value.source() {
            Some(source) => self.record_debug(
                field,
                &format_args!(
                    "{} {}.sources={}",
                    Escaped(shown, sanitize),
                    field.name(),
                    Sources(source, sanitize)
                ),
            ),
            None => self.record_debug(field, &format_args!("{}", Escaped(shown, sanitize))),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() != "message" {
            return self.field(field.name(), |w| write!(w, "{value:?}"));
        }
        if self.result.is_err() {
            return;
        }
        let sanitize = self.sanitize;
        self.result = self
            .pad()
            .and_then(|()| write!(self.writer, "{:?}", Escaped(value, sanitize)));
    }
}

/// A value written with terminal control characters escaped (when `.1`), as the default
/// formatter escapes messages and errors.
struct Escaped<T>(T, bool);

impl<T: fmt::Debug> fmt::Debug for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.1 {
            write!(EscapingWriter(f), "{:?}", self.0)
        } else {
            write!(f, "{:?}", self.0)
        }
    }
}

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.1 {
            write!(EscapingWriter(f), "{}", self.0)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// An error's sources as a list, each escaped.
struct Sources<'a>(&'a (dyn std::error::Error + 'static), bool);

impl fmt::Display for Sources<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        let mut next = Some(self.0);
        while let Some(e) = next {
            list.entry(&Escaped(format_args!("{e}"), self.1));
            next = e.source();
        }
        list.finish()
    }
}

/// Writes ESC, BEL, BS, FF, DEL and the C1 controls as escapes (`\x1b`, `\u{9b}`), the rest
/// as it comes, in runs.
struct EscapingWriter<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl fmt::Write for EscapingWriter<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut run = 0;
        for (i, c) in s.char_indices() {
            let escape = match c {
                '\x1b' => "\\x1b",
                '\x07' => "\\x07",
                '\x08' => "\\x08",
                '\x0c' => "\\x0c",
                '\x7f' => "\\x7f",
                '\u{80}'..='\u{9f}' => "",
                _ => continue,
            };
            self.0.write_str(&s[run..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{{{:x}}}", c as u32)?;
            } else {
                self.0.write_str(escape)?;
            }
            run = i + c.len_utf8();
        }
        self.0.write_str(&s[run..])
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::{Arc, Mutex};

    use proptest::prelude::*;
    use tracing_subscriber::fmt::time::SystemTime;

    use super::*;

    /// What a fmt subscriber with field formatter `fields` writes (no timestamps) while `f`
    /// runs.
    fn render<N>(fields: N, ansi: bool, f: impl FnOnce()) -> String
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(ansi)
            .without_time()
            .fmt_fields(fields)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        String::from_utf8(out.lock().unwrap().clone()).unwrap()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[derive(Debug)]
    struct Outer(io::Error);

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("the \u{1b}[1mouter\u{9b} failure")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// Every kind of field the agent's lines carry, and the awkward ones.
    fn events() {
        let addr: std::net::SocketAddr = "10.146.4.2:40312".parse().unwrap();
        let span = tracing::info_span!("pod", name = "reviews-1", ip = %addr.ip(), n = 3u64);
        let _in = span.enter();
        tracing::info!(target: "access",
            direction = "outbound",
            src.addr = %addr,
            src.identity = Some(tracing::field::display("spiffe://cluster.local/ns/shop/sa/reviews")),
            dst.service = None::<&str>,
            dst.vip = Some(tracing::field::display(addr)),
            bytes_sent = 5u64,
            bytes_recv = 0u64,
            duration_ms = u64::MAX,
            error = "",
            "{}", "connection complete");
        tracing::warn!(
            quoted = "a \"quoted\" \\ back",
            ws = "tab\tnew\nline\r",
            uni = "ünïcode ✓ \u{200b}",
            esc = "\u{1b}[31mred\u{9b}",
            empty = "",
            neg = -42i64,
            min = i64::MIN,
            yes = true,
            no = false,
            ratio = 0.5f64,
            big = 1u128 << 100,
            list = ?vec![1, 2],
            r#type = "raw",
            log.target = "skipped",
            "esc \u{1b}[2J c1 \u{9b} bel \u{7} bs \u{8} ff \u{c} del \u{7f} end");
        span.record("n", 4u64);
        let err = Outer(io::Error::other("inner \u{7} cause"));
        tracing::error!(error = &err as &(dyn std::error::Error + 'static), "failed");
        tracing::error!(message = &err as &(dyn std::error::Error + 'static));
        let plain = io::Error::other("no source");
        tracing::info!(error = &plain as &(dyn std::error::Error + 'static));
        tracing::debug!(only = 1u64);
        tracing::info!("");
        tracing::info!(message = "as a str field \u{1b}", after = "x");
        tracing::info!(message = 7u64, flag = true);
        tracing::info!(message = -7i64);
        tracing::info!(message = false);
    }

    /// Records each `write` it is given, whole.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl Write for Writes {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn line(i: usize, len: usize) -> Vec<u8> {
        let mut l = format!("line {i} ").into_bytes();
        l.resize(len - 1, b'.');
        l.push(b'\n');
        l
    }

    /// A batching thread's lines wait while it works (idle with an event ready) and go out in
    /// one write, in order, when it is about to sleep.
    #[test]
    fn a_batch_waits_while_the_thread_works_and_is_written_in_one_write_before_it_sleeps() {
        let mut b = Batch::default();
        let mut out = Writes::default();
        let lines: Vec<_> = (0..3).map(|i| line(i, 200)).collect();
        for l in &lines {
            assert_eq!(b.push(l, &mut out), 0);
        }
        assert_eq!(b.idle(false, &mut out), 0);
        assert!(
            out.0.is_empty(),
            "written while the thread worked: {:?}",
            out.0.len()
        );
        assert_eq!(b.idle(true, &mut out), 0);
        assert_eq!(out.0, vec![lines.concat()]);
        // Nothing is written twice, and an empty batch writes nothing.
        b.idle(true, &mut out);
        assert_eq!(out.0.len(), 1);
    }

    /// No write is longer than PIPE_BUF or ends inside a line; a line too long to batch goes
    /// alone, after what was batched before it; nothing is lost or reordered.
    #[test]
    fn batches_are_whole_lines_of_at_most_pipe_buf_and_keep_the_order() {
        let mut b = Batch::default();
        let mut out = Writes::default();
        let mut all = Vec::new();
        for i in 0..100 {
            // 37 bytes..., and now and then one longer than a batch.
            let l = line(
                i,
                if i % 40 == 39 {
                    BATCH_MAX + 100
                } else {
                    37 + i * 7
                },
            );
            b.push(&l, &mut out);
            all.extend_from_slice(&l);
        }
        b.idle(true, &mut out);
        assert_eq!(out.0.concat(), all);
        for w in &out.0 {
            assert!(w.ends_with(b"\n"), "a write ends inside a line");
            let one_line = w.iter().filter(|&&c| c == b'\n').count() == 1;
            assert!(
                w.len() <= BATCH_MAX || one_line,
                "{} bytes in one batch",
                w.len()
            );
        }
        // Batched, not one write per line (100 lines of ~400 bytes on average).
        assert!(out.0.len() < 20, "{} writes", out.0.len());
    }

    /// A thread that keeps working (never sleeps) still writes a batch once its oldest line
    /// has waited BATCH_DELAY: at its next idle turn or its next line.
    #[test]
    fn an_overdue_batch_is_written_at_the_next_idle_turn_or_line() {
        let mut out = Writes::default();
        let mut b = Batch::default();
        b.push(&line(0, 50), &mut out);
        b.idle(false, &mut out);
        assert!(out.0.is_empty());
        b.since = Some(Instant::now() - BATCH_DELAY);
        b.idle(false, &mut out);
        assert_eq!(out.0, vec![line(0, 50)]);

        b.push(&line(1, 50), &mut out);
        b.since = Some(Instant::now() - BATCH_DELAY);
        b.push(&line(2, 50), &mut out);
        assert_eq!(
            out.0,
            vec![line(0, 50), line(1, 50)],
            "the overdue line went first"
        );
        b.idle(true, &mut out);
        assert_eq!(out.0[2], line(2, 50));
    }

    /// Written to a non-blocking pipe its reader is not emptying: a batch the pipe cannot take
    /// is dropped whole and its lines counted, never cut; once the reader catches up, batches
    /// arrive whole again.
    #[test]
    fn a_full_pipe_drops_whole_batches_and_counts_their_lines() {
        let (mut reader, mut writer) = io::pipe().unwrap();
        use std::os::fd::AsFd;
        assert!(ambit_common::sys::nonblocking_if_pipe(writer.as_fd()).unwrap());
        // Fill the pipe (bounded: the default pipe holds 64 KiB).
        let filler = [b'f'; 1024];
        let mut filled = 0;
        for _ in 0..1024 {
            match writer.write(&filler) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let mut b = Batch::default();
        for i in 0..3 {
            assert_eq!(b.push(&line(i, 100), &mut writer), 0);
        }
        assert_eq!(b.idle(true, &mut writer), 3, "three lines dropped");
        let mut got = vec![0u8; filled];
        reader.read_exact(&mut got).unwrap();
        assert!(
            got.iter().all(|&c| c == b'f'),
            "part of a dropped batch went out"
        );
        let lines: Vec<_> = (3..5).map(|i| line(i, 100)).collect();
        for l in &lines {
            b.push(l, &mut writer);
        }
        assert_eq!(b.idle(true, &mut writer), 0);
        drop(writer);
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, lines.concat());
    }

    #[test]
    fn plain_fields_write_what_the_default_formatter_writes() {
        for ansi in [false, true] {
            let ours = render(PlainFields, ansi, events);
            let theirs = render(DefaultFields::new(), ansi, events);
            assert_eq!(ours.lines().count(), 10, "{ours}");
            assert_eq!(ours, theirs, "ansi {ansi}");
        }
        // The awkward parts are there to compare, not escaped away by both.
        let ours = render(PlainFields, false, events);
        for part in [
            "pod{name=\"reviews-1\" ip=10.146.4.2 n=3}: access: connection complete direction=\"outbound\"",
            "bytes_sent=5 bytes_recv=0 duration_ms=18446744073709551615 error=\"\"",
            "esc \\x1b[2J c1 \\u{9b} bel \\x07",
            "quoted=\"a \\\"quoted\\\" \\\\ back\"",
            "neg=-42 min=-9223372036854775808 yes=true no=false ratio=0.5",
            "type=\"raw\"",
            "error=the \\x1b[1mouter\\u{9b} failure error.sources=[inner \\x07 cause]",
        ] {
            assert!(ours.contains(part), "{part} missing from\n{ours}");
        }
        assert!(!ours.contains("log.target"), "{ours}");
    }

    proptest! {
        #[test]
        fn any_string_field_or_message_is_written_as_the_default_formatter_writes_it(
            s in any::<String>(), t in "[ -~]{0,20}",
        ) {
            let f = || {
                tracing::info!(field = s.as_str(), other = t.as_str(), "{s}");
                tracing::info!(message = s.as_str());
            };
            prop_assert_eq!(render(PlainFields, false, f), render(DefaultFields::new(), false, f));
        }
    }

    #[test]
    fn the_clock_writes_what_the_default_timer_writes() {
        let format = |t: &dyn FormatTime| {
            let mut s = String::new();
            t.format_time(&mut Writer::new(&mut s)).unwrap();
            s
        };
        // Read between two readings of the default timer that agree to the second (a second
        // boundary between them is retried; it cannot happen twice in a row).
        for _ in 0..3 {
            let (before, ours, after) = (format(&SystemTime), format(&Clock), format(&SystemTime));
            if before[..20] != after[..20] {
                continue;
            }
            assert_eq!(ours.len(), before.len(), "{ours} vs {before}");
            assert_eq!(ours[..20], before[..20], "{ours} vs {before}");
            assert!(ours[20..26].bytes().all(|b| b.is_ascii_digit()) && ours.ends_with('Z'));
            assert!(before <= ours && ours <= after, "{before} {ours} {after}");
            return;
        }
        panic!("the second changed between every reading");
    }
}
