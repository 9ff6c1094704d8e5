//! Progress of `tandem verify` and `tandem resync` (seeding a replica is a resync): bars on a
//! terminal (users, then the mails of the user at hand, with rate and ETA), the service's
//! plain lines otherwise, so that logs and scripts read the same text as before.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

const USERS: &str = "users {pos}/{len} [{wide_bar}] {elapsed_precise}, ETA {eta}";
const MAILS: &str = "{msg}\n  mails {pos}/{len} [{wide_bar}] {per_sec}, ETA {eta}";

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

pub(crate) struct Progress {
    /// None: not a terminal (or --json): lines only.
    bars: Option<Bars>,
}

struct Bars {
    multi: MultiProgress,
    users: Option<ProgressBar>,
    mails: Option<ProgressBar>,
}

impl Progress {
    pub(crate) fn new(json: bool) -> Progress {
        let bars = (!json && std::io::stderr().is_terminal()).then(|| Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            users: None,
            mails: None,
        });
        Progress { bars }
    }

    /// A line of output (already cleaned of control characters): above the bars on a
    /// terminal, on stdout either way.
    pub(crate) fn line(&self, text: &str) {
        match &self.bars {
            // The bars (on stderr) step aside while the line goes to stdout, then come back.
            Some(b) => b.multi.suspend(|| println!("{text}")),
            None => println!("{text}"),
        }
    }

    /// The service says how many users it will go through.
    pub(crate) fn users(&mut self, total: u64) {
        let Some(b) = &mut self.bars else { return };
        if total < 2 {
            return;
        }
        let bar = b.multi.add(ProgressBar::new(total));
        bar.set_style(style(USERS));
        b.users = Some(bar);
    }

    /// A line of progress from the service, with the mails done of those to save when known.
    pub(crate) fn step(&mut self, text: &str, mails: Option<(u64, u64)>) {
        let Some(b) = &mut self.bars else {
            println!("{text}");
            return;
        };
        match mails {
            Some((done, total)) => {
                let bar = b.mails.get_or_insert_with(|| {
                    let bar = b.multi.add(ProgressBar::new(total));
                    bar.set_style(style(MAILS));
                    bar
                });
                bar.set_length(total);
                bar.set_position(done);
                bar.set_message(text.to_string());
            }
            None => {
                if let Some(bar) = &b.mails {
                    bar.set_message(text.to_string());
                } else {
                    let _ = b.multi.println(text);
                }
            }
        }
    }

    /// A user is done (its report came).
    pub(crate) fn user_done(&mut self) {
        let Some(b) = &mut self.bars else { return };
        if let Some(bar) = b.mails.take() {
            bar.finish_and_clear();
            b.multi.remove(&bar);
        }
        if let Some(users) = &b.users {
            users.inc(1);
        }
    }

    pub(crate) fn finish(&mut self) {
        if let Some(b) = &mut self.bars {
            for bar in [b.mails.take(), b.users.take()].into_iter().flatten() {
                bar.finish_and_clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_templates_are_valid() {
        for t in [USERS, MAILS] {
            assert!(ProgressStyle::with_template(t).is_ok(), "{t}");
        }
    }

    #[test]
    fn without_a_terminal_progress_is_lines_and_no_bars() {
        let mut p = Progress { bars: None };
        p.users(3);
        p.step("user alice: saved here 64/128", Some((64, 128)));
        p.user_done();
        p.finish();
        assert!(p.bars.is_none());
    }
}
