//! Where a build's time goes, step by step: what `sandoff build --timings`
//! adds up and `--json` reports per build (`"event": "timings"`), so that
//! the cost of a trivial local build can be found rather than guessed.
//!
//! A [`Timings`] is a stopwatch with one lap counter per [`Step`]: each
//! call to [`Timings::lap`] charges the time since the previous lap to a
//! step. Steps that a build skips (a remote build runs no sandbox) stay
//! at zero.

use std::time::{Duration, Instant};

/// One step of realising a derivation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// Taking the outputs' locks and checking their validity.
    Lock,
    /// Opening the build log.
    Log,
    /// Finding the inputs and their closure.
    Inputs,
    /// Deciding where to build and waiting for a job slot (and, remotely,
    /// the whole remote build).
    Place,
    /// Leasing a build user.
    User,
    /// Creating the build's directories.
    Dirs,
    /// Setting up the sandbox and running the builder in it.
    Sandbox,
    /// Copying the outputs into the store's staging area and hashing them.
    Stage,
    /// Scanning the outputs for references.
    Scan,
    /// Registering the outputs (the database transaction and its syncs).
    Register,
    /// Removing the build's directories and releasing the user.
    Cleanup,
}

impl Step {
    /// Every step, in the order a build takes them.
    pub const ALL: [Step; 11] = [
        Step::Lock,
        Step::Log,
        Step::Inputs,
        Step::Place,
        Step::User,
        Step::Dirs,
        Step::Sandbox,
        Step::Stage,
        Step::Scan,
        Step::Register,
        Step::Cleanup,
    ];

    /// Its name in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Step::Lock => "lock",
            Step::Log => "log",
            Step::Inputs => "inputs",
            Step::Place => "place",
            Step::User => "user",
            Step::Dirs => "dirs",
            Step::Sandbox => "sandbox",
            Step::Stage => "stage",
            Step::Scan => "scan",
            Step::Register => "register",
            Step::Cleanup => "cleanup",
        }
    }
}

/// The time of each step of one build, or summed over builds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepTimes {
    laps: [Duration; Step::ALL.len()],
}

impl StepTimes {
    /// Each step and its time, in order.
    pub fn steps(&self) -> impl Iterator<Item = (Step, Duration)> + '_ {
        Step::ALL.iter().map(|&s| (s, self.laps[s as usize]))
    }

    /// Adds `other`'s steps to these (totals over many builds).
    pub fn add(&mut self, other: &StepTimes) {
        for (s, d) in other.steps() {
            self.laps[s as usize] += d;
        }
    }

    /// The sum of all steps.
    pub fn total(&self) -> Duration {
        self.laps.iter().sum()
    }
}

/// A stopwatch charging laps to steps.
#[derive(Clone, Debug)]
pub struct Timings {
    times: StepTimes,
    last: Instant,
}

impl Timings {
    /// Starts the watch now.
    pub fn start() -> Timings {
        Timings {
            times: StepTimes::default(),
            last: Instant::now(),
        }
    }

    /// Charges the time since the previous lap (or the start) to `step`.
    pub fn lap(&mut self, step: Step) {
        let now = Instant::now();
        self.times.laps[step as usize] += now.saturating_duration_since(self.last);
        self.last = now;
    }

    /// The times so far.
    pub fn times(&self) -> &StepTimes {
        &self.times
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laps_are_charged_to_their_steps_and_add_up() {
        let mut t = Timings::start();
        std::thread::sleep(Duration::from_millis(2));
        t.lap(Step::Sandbox);
        t.lap(Step::Lock);
        let t = t.times();
        let sandbox = t
            .steps()
            .find(|(s, _)| *s == Step::Sandbox)
            .expect("step")
            .1;
        assert!(sandbox >= Duration::from_millis(2));
        assert_eq!(t.steps().count(), Step::ALL.len());
        let mut sum = StepTimes::default();
        sum.add(t);
        sum.add(t);
        assert_eq!(sum.total(), 2 * t.total());
        for (i, s) in Step::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "ALL is in declaration order");
        }
    }
}
