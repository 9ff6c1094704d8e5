//! The durable per-user change journal: append-only segment files of CRC-framed records.
//!
//! - [`format`]: the byte layout, pure encode/decode (documented in docs/journal-format.md).
//! - [`writer`]: appends under an exclusive lock, safe with many processes of one user.
//! - [`reader`]: reads from an LSN, verifies, gives stats, drops acknowledged segments.
//! - [`mark`]: the "needs a resync" mark left when changes could not be journaled.
//! - [`safe`]: opening files in a directory a user controls, for the root service.

pub mod format;
pub mod mark;
pub mod reader;
pub mod safe;
pub mod segment;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;
pub mod writer;

pub use mark::{clear_resync, mark_resync, read_resync, ResyncMark};
pub use reader::{Cursor, Damage, Problem, Reader, Stats, VerifyReport};
pub use writer::Writer;

use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} at offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("{0}: no journal here")]
    Missing(PathBuf),
    #[error("timed out after {0:?} waiting for the journal lock")]
    LockTimeout(std::time::Duration),
    /// A file or directory the reader will not touch: a symlink a user controls, a FIFO, a
    /// file of the wrong owner or far too large.
    #[error("{path}: refused: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("record too large to journal: {0}")]
    TooLarge(String),
}

impl JournalError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> JournalError {
        JournalError::Io {
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests;
