//! The installer's resident loop: install, then re-install whenever the CNI configuration
//! directory or the plugin binary changes (inotify), and at least every `resync` anyway, until
//! SIGTERM or SIGINT.
//!
//! Why no write loop: every pass is idempotent (see [`crate::install`]), so the events our own
//! writes cause lead to a pass that writes nothing. What remains is a fight with a primary CNI
//! that rewrites its file whenever it changes: [`Fight`] notices repeated rewrites, backs off
//! (1 s doubling to 60 s) and says to use own-file mode.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use tracing::{error, info, warn};

use crate::install::{self, Outcome, Settings};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("inotify on {what}: {source}")]
    Inotify { what: String, source: nix::Error },
    #[error("signal handling: {0}")]
    Signal(nix::Error),
    #[error("poll: {0}")]
    Poll(nix::Error),
}

/// Counts our rewrites of one file; past a few in a short window it is a fight.
#[derive(Debug, Default)]
pub struct Fight {
    writes: Vec<Instant>,
    delay: Option<Duration>,
}

impl Fight {
    const WINDOW: Duration = Duration::from_secs(60);
    const LIMIT: usize = 5;
    const MAX_DELAY: Duration = Duration::from_secs(60);

    /// Records a rewrite made at `now`; returns how long to wait before the next one, if the
    /// rewrites look like a fight.
    pub fn wrote(&mut self, now: Instant) -> Option<Duration> {
        self.writes
            .retain(|t| now.saturating_duration_since(*t) < Self::WINDOW);
        self.writes.push(now);
        if self.writes.len() <= Self::LIMIT {
            self.delay = None;
            return None;
        }
        let next = self
            .delay
            .map_or(Duration::from_secs(1), |d| (d * 2).min(Self::MAX_DELAY));
        self.delay = Some(next);
        Some(next)
    }
}

/// Why the loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    Signal(Signal),
}

fn watch_dir(ino: &Inotify, dir: &std::path::Path) -> Result<(), Error> {
    let flags = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB;
    ino.add_watch(dir, flags)
        .map(|_| ())
        .map_err(|source| Error::Inotify {
            what: dir.display().to_string(),
            source,
        })
}

/// One pass: the binary, then the configuration. Logs and returns what happened.
pub fn pass(s: &Settings) -> Option<Outcome> {
    if let Err(e) = install::install_binary(s) {
        error!("installing the plugin binary failed: {e}");
    }
    match install::install_config(s) {
        Ok(Outcome::NoPrimary) => {
            warn!(
                dir = %s.conf_dir.display(),
                "no pod network configuration yet: waiting for the primary CNI to write one"
            );
            Some(Outcome::NoPrimary)
        }
        Ok(o) => Some(o),
        Err(e) => {
            error!("chaining ambit-cni into the CNI configuration failed: {e}");
            None
        }
    }
}

/// Runs until SIGTERM/SIGINT. Blocks the calling thread.
pub fn run(s: &Settings, resync: Duration) -> Result<Exit, Error> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.thread_block().map_err(Error::Signal)?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(Error::Signal)?;
    let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(|source| {
        Error::Inotify {
            what: "init".into(),
            source,
        }
    })?;
    watch_dir(&ino, &s.conf_dir)?;
    watch_dir(&ino, &s.bin_dir)?;
    let mut fight = Fight::default();
    let mut hold_until: Option<Instant> = None;
    let mut due = true;
    let mut last_pass = Instant::now();
    loop {
        let now = Instant::now();
        if now.duration_since(last_pass) >= resync {
            due = true;
        }
        if due && hold_until.is_none_or(|t| now >= t) {
            due = false;
            last_pass = now;
            hold_until = None;
            if let Some(Outcome::Wrote(path)) = pass(s)
                && let Some(wait) = fight.wrote(Instant::now())
            {
                warn!(
                    file = %path.display(),
                    wait_s = wait.as_secs(),
                    "another agent keeps rewriting this file and dropping ambit-cni; backing off. \
                     Run the installer with --mode own-file to stop the fight"
                );
                hold_until = Some(Instant::now() + wait);
            }
        }
        let next = [Some(last_pass + resync), hold_until.filter(|_| due)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + resync);
        let timeout = next.saturating_duration_since(Instant::now());
        let timeout = PollTimeout::try_from(timeout.as_millis().min(60_000) as u32 + 1)
            .unwrap_or(PollTimeout::MAX);
        let mut fds = [
            PollFd::new(ino.as_fd(), PollFlags::POLLIN),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(Error::Poll(e)),
        }
        if let Ok(Some(sig)) = signals.read_signal() {
            let sig = Signal::try_from(sig.ssi_signo as i32).unwrap_or(Signal::SIGTERM);
            info!(signal = %sig, "stopping");
            return Ok(Exit::Signal(sig));
        }
        let mut changed = false;
        while let Ok(events) = ino.read_events() {
            if events.is_empty() {
                break;
            }
            // Our own temporary files come and go with every write: not a change.
            changed |= events.iter().any(|e| {
                e.name
                    .as_ref()
                    .is_none_or(|n| !n.to_string_lossy().ends_with(crate::files::TMP_SUFFIX))
            });
        }
        if changed {
            // Let a burst of events (a primary CNI writing several files) settle first.
            std::thread::sleep(Duration::from_millis(100));
            while ino.read_events().is_ok_and(|e| !e.is_empty()) {}
            due = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_rewrites_are_normal_and_a_fight_backs_off_to_a_minute() {
        let mut f = Fight::default();
        let t0 = Instant::now();
        for i in 0..5 {
            assert_eq!(f.wrote(t0 + Duration::from_secs(i)), None);
        }
        let waits: Vec<_> = (5..13)
            .map(|i| f.wrote(t0 + Duration::from_secs(i)).unwrap().as_secs())
            .collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 60, 60]);
        // Quiet for longer than the window: back to normal.
        assert_eq!(f.wrote(t0 + Duration::from_secs(200)), None);
    }
}
