//! Terminal output: colors (off for NO_COLOR, `--no-color` and non-TTYs),
//! progress spinners on a TTY and plain lines elsewhere, and error chains.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use console::style;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_engine::Progress;
use kiln_image::bake::Event;
use kiln_model::{Action, Change};

pub fn init(no_color: bool) {
    let off = no_color || std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    if off {
        console::set_colors_enabled(false);
        console::set_colors_enabled_stderr(false);
    }
}

/// Prints an error and its whole chain of causes to stderr.
pub fn error(e: &anyhow::Error) {
    eprintln!("{} {e}", style("error:").red().bold());
    for cause in e.chain().skip(1) {
        eprintln!("  {} {cause}", style("caused by:").dim());
    }
}

pub fn stderr_is_tty() -> bool {
    std::io::stderr().is_terminal()
}

/// Renders bake events: a spinner per image on a TTY, plain lines otherwise.
pub struct BuildProgress {
    bar: Mutex<Option<ProgressBar>>,
    tty: bool,
}

impl BuildProgress {
    pub fn new() -> BuildProgress {
        BuildProgress {
            bar: Mutex::new(None),
            tty: stderr_is_tty(),
        }
    }

    pub fn event(&self, e: Event) {
        let mut bar = self.bar.lock().expect("progress lock");
        match e {
            Event::Begin { image } => {
                if self.tty {
                    let b = ProgressBar::new_spinner();
                    b.set_style(
                        ProgressStyle::with_template(
                            "{spinner:.cyan} {prefix:.bold} [{elapsed}] {msg}",
                        )
                        .expect("template"),
                    );
                    b.set_prefix(image);
                    b.enable_steady_tick(Duration::from_millis(100));
                    *bar = Some(b);
                }
            }
            Event::Step { image, step } => match bar.as_ref() {
                Some(b) => b.set_message(step),
                None => eprintln!("{image}: {step}"),
            },
            Event::Output { line, .. } => {
                if let Some(b) = bar.as_ref() {
                    let msg = b.message();
                    let step = msg.split(" │ ").next().unwrap_or("").to_string();
                    let line: String = line.chars().take(70).collect();
                    b.set_message(format!("{step} │ {}", style(line).dim()));
                }
            }
            Event::Warn { image, message } => {
                let line = format!("{} {image}: {message}", style("warning:").yellow().bold());
                match bar.as_ref() {
                    Some(b) => b.println(line),
                    None => eprintln!("{line}"),
                }
            }
            Event::Cached {
                image,
                version,
                digest,
            } => {
                let line = format!(
                    "{} {} v{version} {} {}",
                    style("=").dim(),
                    style(&image).bold(),
                    style(digest.short()).dim(),
                    style("(cached)").dim()
                );
                finish(bar.take(), &line);
            }
            Event::Built {
                image,
                version,
                digest,
                elapsed,
            } => {
                let line = format!(
                    "{} {} v{version} {} ({:.1}s)",
                    style("+").green().bold(),
                    style(&image).bold(),
                    style(digest.short()).dim(),
                    elapsed.as_secs_f64()
                );
                finish(bar.take(), &line);
            }
        }
    }

    /// Clears a spinner left by a failed build.
    pub fn abandon(&self) {
        if let Some(b) = self.bar.lock().expect("progress lock").take() {
            b.finish_and_clear();
        }
    }
}

fn finish(bar: Option<ProgressBar>, line: &str) {
    match bar {
        Some(b) => {
            b.finish_and_clear();
            eprintln!("{line}");
        }
        None => eprintln!("{line}"),
    }
}

/// Formats a byte count the way people read them.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Prints a table with aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(console::measure_text_width(c));
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                console::pad_str(c, widths[i], console::Alignment::Left, None).into_owned()
            })
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| style(h).bold().to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// Renders engine progress to stderr: plain lines, plus a spinner while a
/// server's health is awaited when stderr is a terminal.
pub fn engine_progress(quiet: bool) -> impl Fn(Progress) {
    let spinner: std::sync::Mutex<Option<indicatif::ProgressBar>> = std::sync::Mutex::new(None);
    let tty = stderr_is_tty();
    move |p| {
        if quiet {
            return;
        }
        if let Some(bar) = spinner.lock().expect("spinner lock").take() {
            bar.finish_and_clear();
        }
        match p {
            Progress::Converged { detail } => eprintln!("{} {detail}", style("cleanup:").yellow()),
            Progress::Step {
                index,
                total,
                change,
            } => {
                let (mark, verb) = match change.action() {
                    Action::Create => (style("+").green(), "creating"),
                    Action::Replace => (style("~").yellow(), "replacing"),
                    Action::Destroy => (style("-").red(), "destroying"),
                };
                let extra = match &change {
                    Change::Replace(r) => format!(" by {}", r.replacement),
                    _ => String::new(),
                };
                eprintln!(
                    "[{index}/{total}] batch {} {mark} {verb} {}{extra} ({})",
                    change.batch(),
                    change.server(),
                    change.reason()
                );
            }
            Progress::Waiting { server, address } if tty => {
                let bar = indicatif::ProgressBar::new_spinner();
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "        {spinner:.cyan} {msg} [{elapsed}]",
                    )
                    .expect("template"),
                );
                bar.set_message(format!("waiting for {server} at {address} to be healthy"));
                bar.enable_steady_tick(Duration::from_millis(80));
                *spinner.lock().expect("spinner lock") = Some(bar);
            }
            Progress::Waiting { server, address } => {
                eprintln!("        waiting for {server} at {address} to be healthy")
            }
            Progress::Healthy {
                server, elapsed, ..
            } => eprintln!(
                "        {} {server} healthy after {} ms",
                style("✓").green(),
                elapsed.as_millis()
            ),
            Progress::Destroyed { server } => {
                eprintln!("        {} {server} destroyed", style("✗").red())
            }
            Progress::Switched { roles, share } => {
                let traffic: Vec<String> = share.iter().filter(|(_, _, total)| *total > 0).map(|(role, new, total)| format!("{role}: {new}/{total} servers on the new image, {}% of new connections", new * 100 / total)).collect();
                eprintln!(
                    "        {} balancer of {} switched to the new servers ({})",
                    style("⇄").cyan(),
                    roles.join(", "),
                    traffic.join("; ")
                );
            }
            Progress::Standby { server, secs } => eprintln!(
                "        {} {server} kept warm out of the balancer for {} (rollback window)",
                style("◐").yellow(),
                kiln_spec::format_duration(secs)
            ),
            Progress::Baking { role, secs } if tty => {
                let bar = indicatif::ProgressBar::new(secs.max(1));
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "        {spinner:.cyan} canary of {msg} baking [{bar:20}] {eta} left",
                    )
                    .expect("template"),
                );
                bar.set_message(role);
                bar.enable_steady_tick(Duration::from_millis(200));
                let ticker = bar.clone();
                std::thread::spawn(move || {
                    while !ticker.is_finished() && ticker.position() < ticker.length().unwrap_or(0)
                    {
                        std::thread::sleep(Duration::from_secs(1));
                        ticker.inc(1);
                    }
                });
                *spinner.lock().expect("spinner lock") = Some(bar);
            }
            Progress::Baking { role, secs } => eprintln!(
                "        {} canary of {role} baking for {}",
                style("…").cyan(),
                kiln_spec::format_duration(secs)
            ),
            Progress::RollingBack { to, reason } => eprintln!(
                "{} {reason}\n{} returning to release #{to}",
                style("failed:").red().bold(),
                style("rollback:").yellow().bold()
            ),
        }
    }
}
