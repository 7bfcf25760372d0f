//! `PEFT_HOST_PROFILE=FILE`: where the host's CPU time goes during a dev tool's run. Every thread
//! is sampled ~2,000 times a second of CPU time (pprof's `SIGPROF` timer: a thread waiting on the
//! device costs nothing and is not sampled); at the end `FILE` gets one line per distinct stack,
//! `thread;outermost;..;innermost count`, largest first (the folded format of flamegraph tools;
//! `scripts/host_profile.py FILE` sums it by function). Keep the binary's symbols (`strip
//! --strip-debug`, not `strip`), or the frames are addresses.

use anyhow::{Context, Result};

/// A running profile, written by [`HostProfile::finish`].
pub struct HostProfile {
    guard: pprof::ProfilerGuard<'static>,
    path: std::path::PathBuf,
}

/// Starts sampling when `PEFT_HOST_PROFILE` names a file.
pub fn start() -> Result<Option<HostProfile>> {
    let Some(path) = std::env::var_os("PEFT_HOST_PROFILE") else {
        return Ok(None);
    };
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(1999)
        // Unwinding inside these can deadlock on the signal.
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
        .context("starting the host profiler (PEFT_HOST_PROFILE)")?;
    Ok(Some(HostProfile {
        guard,
        path: path.into(),
    }))
}

impl HostProfile {
    /// Writes the folded stacks to the file.
    pub fn finish(self) -> Result<()> {
        let report = self
            .guard
            .report()
            .build()
            .context("building the host profile")?;
        let mut lines: Vec<(isize, String)> = report
            .data
            .iter()
            .map(|(frames, count)| {
                let mut stack = vec![frames.thread_name.clone()];
                for frame in frames.frames.iter().rev() {
                    for symbol in frame.iter().rev() {
                        stack.push(symbol.name().replace(';', ":"));
                    }
                }
                (*count, stack.join(";"))
            })
            .collect();
        lines.sort_by_key(|l| std::cmp::Reverse(l.0));
        let text: String = lines
            .iter()
            .map(|(count, stack)| format!("{stack} {count}\n"))
            .collect();
        std::fs::write(&self.path, text)
            .with_context(|| format!("writing the host profile to {}", self.path.display()))?;
        eprintln!(
            "host profile: {} samples in {} stacks written to {}",
            lines.iter().map(|l| l.0).sum::<isize>(),
            lines.len(),
            self.path.display()
        );
        Ok(())
    }
}
