//! Checkpoints: the adapter in PEFT's format, the optimizer state and the trainer state,
//! written to a temporary folder and renamed into place (a kill never leaves half a checkpoint).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where the run is: enough to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub global_step: u64,
    /// Epoch the next micro-batch belongs to.
    pub epoch: u64,
    /// Micro-batches of that epoch already consumed.
    pub batches_in_epoch: usize,
    /// The run's seed.
    pub seed: u64,
    /// Total optimizer steps planned.
    pub max_steps: u64,
    /// The adapter name.
    pub adapter: String,
    /// Processes of the run (data parallelism); 1 in checkpoints written before it existed.
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

/// Prefix of checkpoint folders (`checkpoint-<step>`, as HF's Trainer names them).
pub const PREFIX: &str = "checkpoint-";

/// Checkpoint folders under `dir`, oldest first.
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix(PREFIX)?.parse().ok()?;
            e.path()
                .join("trainer_state.json")
                .exists()
                .then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The newest complete checkpoint, if any.
pub fn latest(dir: &Path) -> Option<PathBuf> {
    list(dir).pop().map(|(_, p)| p)
}

/// Writes a checkpoint atomically: `fill` writes the files into a temporary folder, which is
/// then renamed to `checkpoint-<step>`; older ones beyond `keep` are deleted.
pub fn write(
    dir: &Path,
    state: &TrainerState,
    keep: usize,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let final_dir = dir.join(format!("{PREFIX}{}", state.global_step));
    let tmp = dir.join(format!(".tmp-{PREFIX}{}", state.global_step));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    fill(&tmp)?;
    let json = serde_json::to_string_pretty(state).expect("state serialises");
    std::fs::write(tmp.join("trainer_state.json"), json).map_err(|e| Error::io(&tmp, e))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    if keep > 0 {
        let all = list(dir);
        for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(final_dir)
}

/// Reads `trainer_state.json` of a checkpoint.
pub fn read_state(ckpt: &Path) -> Result<TrainerState> {
    let f = ckpt.join("trainer_state.json");
    let text = std::fs::read_to_string(&f).map_err(|e| Error::io(&f, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: ckpt.into(),
        message: format!("trainer_state.json: {e}"),
    })
}
