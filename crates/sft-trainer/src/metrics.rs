//! `metrics.jsonl` (one JSON object per log line) and the loss-curve PNG.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One logged point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Optimizer step.
    pub step: u64,
    /// Fractional epoch.
    pub epoch: f64,
    /// Mean training loss over the logging window (absent on eval-only lines).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Evaluation loss (eval lines only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Learning rate of the last step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// Gradient norm before clipping.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Non-padding tokens processed per second over the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// Resident host memory in MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_mem_mib: Option<f64>,
}

/// Appends log entries to `<output_dir>/metrics.jsonl`.
pub struct MetricsWriter {
    path: PathBuf,
}

impl MetricsWriter {
    /// Opens (appending) `dir/metrics.jsonl`.
    pub fn new(dir: &Path) -> Self {
        MetricsWriter {
            path: dir.join("metrics.jsonl"),
        }
    }

    /// Keeps only entries up to `step` (after a resume, later lines belong to the lost run).
    pub fn truncate_after(&self, step: u64) -> Result<()> {
        let kept: Vec<LogEntry> = read_metrics(&self.path)?
            .into_iter()
            .filter(|e| e.step <= step)
            .collect();
        let text: String = kept
            .iter()
            .map(|e| serde_json::to_string(e).expect("json") + "\n")
            .collect();
        std::fs::write(&self.path, text).map_err(|e| Error::io(&self.path, e))
    }

    /// Appends one entry.
    pub fn write(&self, e: &LogEntry) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|err| Error::io(&self.path, err))?;
        writeln!(f, "{}", serde_json::to_string(e).expect("json"))
            .map_err(|err| Error::io(&self.path, err))
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a `metrics.jsonl` (missing file = no entries).
pub fn read_metrics(path: &Path) -> Result<Vec<LogEntry>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Resident set size of this process in MiB (Linux), if known.
pub fn host_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Draws training loss (blue) and eval loss (orange dots) against step into a PNG.
pub fn plot_loss(entries: &[LogEntry], path: &Path) -> Result<()> {
    let (w, h, margin) = (800usize, 480usize, 40usize);
    let mut img = vec![255u8; w * h * 3];
    let train: Vec<(f64, f64)> = entries
        .iter()
        .filter_map(|e| e.loss.map(|l| (e.step as f64, l)))
        .collect();
    let eval: Vec<(f64, f64)> = entries
        .iter()
        .filter_map(|e| e.eval_loss.map(|l| (e.step as f64, l)))
        .collect();
    let all: Vec<&(f64, f64)> = train.iter().chain(eval.iter()).collect();
    if !all.is_empty() {
        let (x0, x1) = all
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
        let (y0, y1) = all
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let sx = |x: f64| margin as f64 + (x - x0) / (x1 - x0).max(1e-9) * (w - 2 * margin) as f64;
        let sy =
            |y: f64| (h - margin) as f64 - (y - y0) / (y1 - y0).max(1e-9) * (h - 2 * margin) as f64;
        let mut put = |x: i64, y: i64, c: [u8; 3]| {
            if x >= 0 && y >= 0 && (x as usize) < w && (y as usize) < h {
                let i = (y as usize * w + x as usize) * 3;
                img[i..i + 3].copy_from_slice(&c);
            }
        };
        // Axes.
        for x in margin..w - margin {
            put(x as i64, (h - margin) as i64, [0, 0, 0]);
        }
        for y in margin..h - margin {
            put(margin as i64, y as i64, [0, 0, 0]);
        }
        for pair in train.windows(2) {
            let (ax, ay, bx, by) = (sx(pair[0].0), sy(pair[0].1), sx(pair[1].0), sy(pair[1].1));
            let n = ((bx - ax).abs().max((by - ay).abs()) as usize).max(1);
            for k in 0..=n {
                let t = k as f64 / n as f64;
                let (x, y) = (ax + t * (bx - ax), ay + t * (by - ay));
                for d in -1..=1 {
                    put(x as i64, y as i64 + d, [31, 119, 180]);
                }
            }
        }
        for &(x, y) in &eval {
            for dx in -3..=3 {
                for dy in -3..=3 {
                    put(sx(x) as i64 + dx, sy(y) as i64 + dy, [255, 127, 14]);
                }
            }
        }
    }
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc
        .write_header()
        .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))?;
    writer
        .write_image_data(&img)
        .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))
}
