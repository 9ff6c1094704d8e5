//! Test-only (feature `test-hooks`): a record of what each fsync made durable, so that an
//! end-to-end test can simulate a power loss by cutting a segment back to what the disk holds.
//!
//! Every process that syncs a segment (a mail process as the user, the service as root)
//! appends `<segment file name> <length>` to its own `.test-durable.<euid>` file in the journal
//! directory; a power loss keeps at least the largest length listed for a segment.

use std::io::Write;
use std::path::Path;

pub fn durable(segment: &Path, len: u64) {
    let (Some(dir), Some(name)) = (segment.parent(), segment.file_name()) else {
        return;
    };
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let log = dir.join(format!(".test-durable.{uid}"));
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = writeln!(f, "{} {len}", name.to_string_lossy());
    }
}
