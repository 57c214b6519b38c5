//! JSON Lines output files written around the page cache.
//!
//! A 1M-event run writes about 2.6 GB of output lines. Through the page cache, the kernel
//! copies every byte into freshly allocated cache pages, and on this project's machines that
//! copy alone cost 5 to 6.5 s of system time per 2.6 GB (`dd`, buffered), against 0.3 s with
//! `O_DIRECT`, which hands the disk the process's own memory. So on Linux the files are
//! opened with `O_DIRECT` where the file system allows it (tmpfs, for one, does not), lines
//! are encoded straight into a block-aligned buffer, and only whole blocks are written; the
//! last partial block goes out through the page cache once the file is finished. Elsewhere,
//! or where a file system refuses direct writes, the same type writes through the page cache.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use idgraph_model::WriteJson;

/// Alignment of direct writes, in memory, in the file and in length: the largest logical
/// block size of common disks.
const BLOCK: usize = 4096;

/// Encoded bytes collected before a write: large enough that a direct write's wait for the
/// disk is paid rarely, small enough to be a negligible part of a worker's memory.
const CHUNK: usize = 1 << 20;

/// An output file of JSON lines. Call [`LineFile::finish`] at the end; dropping it without
/// finishing writes what it holds but cannot report an error.
pub struct LineFile {
    file: File,
    path: PathBuf,
    /// Whether the file bypasses the page cache (only whole, aligned blocks may be written).
    direct: bool,
    /// Encoded lines not yet written are `buffer[start..]`; `start` puts them on a block
    /// boundary in memory.
    buffer: Vec<u8>,
    start: usize,
    /// Bytes before `buffer[start]`: the file offset the pending bytes go to.
    written: u64,
}

impl LineFile {
    /// Creates (or truncates) the file at `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let (file, direct) =
            open_output(path, true).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self::writing_at(file, path, direct, 0, &[]))
    }

    /// A line file whose next byte goes to offset `written`, with `pending` (bytes from
    /// `written` on, shorter than a block) still to be written there.
    fn writing_at(file: File, path: &Path, direct: bool, written: u64, pending: &[u8]) -> Self {
        let (mut buffer, start) = aligned_buffer(CHUNK);
        buffer.extend_from_slice(pending);
        LineFile {
            file,
            path: path.to_owned(),
            direct,
            buffer,
            start,
            written,
        }
    }

    /// Opens the file at `path` to go on writing after its first `length` bytes (the length a
    /// checkpoint recorded), cutting off whatever a run wrote after them. Fails if the file is
    /// shorter than that.
    pub fn resume(path: &Path, length: u64) -> Result<Self> {
        let (mut file, direct) =
            open_output(path, false).with_context(|| format!("cannot open {}", path.display()))?;
        let actual = file
            .metadata()
            .with_context(|| format!("cannot read the length of {}", path.display()))?
            .len();
        if actual < length {
            anyhow::bail!(
                "{} holds {actual} bytes, fewer than the {length} the state's last checkpoint \
                 recorded; it is not the output of this state (rerun with the --output-dir of \
                 the run that made the state, or start over with a new --state)",
                path.display()
            );
        }
        file.set_len(length)
            .with_context(|| format!("cannot cut {} back to {length} bytes", path.display()))?;
        // Direct writes start on a block boundary: the partial block before `length` is read
        // back and written again with the lines that follow it.
        let written = if direct {
            length / BLOCK as u64 * BLOCK as u64
        } else {
            length
        };
        let mut tail = vec![0; (length - written) as usize];
        if !tail.is_empty() {
            use std::os::unix::fs::FileExt;
            File::open(path)
                .and_then(|reader| reader.read_exact_at(&mut tail, written))
                .with_context(|| format!("cannot read the end of {}", path.display()))?;
        }
        file.seek(SeekFrom::Start(written))
            .with_context(|| format!("cannot seek in {}", path.display()))?;
        Ok(Self::writing_at(file, path, direct, written, &tail))
    }

    /// Puts every line written so far into the file, where it outlives the process (and
    /// with `sync`, the machine), and returns the file's length: what a checkpoint records.
    pub fn checkpoint(&mut self, sync: bool) -> Result<u64> {
        self.write_whole_blocks()?;
        let pending = self.buffer.len() - self.start;
        if pending > 0 {
            if self.direct {
                self.write_padded_tail(pending)?;
            } else {
                self.write_pending(pending)?;
            }
        }
        if sync {
            self.file
                .sync_data()
                .with_context(|| format!("cannot sync {}", self.path.display()))?;
        }
        Ok(self.written + (self.buffer.len() - self.start) as u64)
    }

    /// A direct write takes whole blocks only: the last partial block goes out padded with
    /// zeros, the file is cut back to its real length, and the block's lines stay pending,
    /// to be written again together with the lines that follow them.
    fn write_padded_tail(&mut self, pending: usize) -> Result<()> {
        self.realign();
        self.buffer.resize(self.start + BLOCK, 0);
        let result = self
            .file
            .write_all(&self.buffer[self.start..self.start + BLOCK]);
        self.buffer.truncate(self.start + pending);
        match result {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                self.stop_direct()?;
                return self.write_pending(pending);
            }
            Err(error) => return Err(self.write_error(error)),
        }
        let length = self.written + pending as u64;
        self.file
            .set_len(length)
            .and_then(|()| self.file.seek(SeekFrom::Start(self.written)).map(drop))
            .map_err(|error| self.write_error(error))
    }

    /// Whether writes bypass the page cache.
    #[cfg(test)]
    fn is_direct(&self) -> bool {
        self.direct
    }

    /// Appends one line per record. Lines may stay in memory until [`LineFile::finish`].
    pub fn write_lines<T: WriteJson>(&mut self, records: &[T]) -> Result<()> {
        for record in records {
            record.write_json(&mut self.buffer);
            self.buffer.push(b'\n');
            if self.buffer.len() - self.start >= CHUNK {
                self.write_whole_blocks()?;
            }
        }
        Ok(())
    }

    /// Writes everything still held. The file then holds every line written to it.
    pub fn finish(&mut self) -> Result<()> {
        self.write_whole_blocks()?;
        if self.buffer.len() > self.start {
            // What is left is shorter than a block, which a direct write cannot take.
            if self.direct {
                self.stop_direct()?;
            }
            self.write_pending(self.buffer.len() - self.start)?;
        }
        Ok(())
    }

    /// Writes all pending bytes, or with direct writes all whole blocks of them.
    fn write_whole_blocks(&mut self) -> Result<()> {
        let pending = self.buffer.len() - self.start;
        if !self.direct {
            return self.write_pending(pending);
        }
        self.realign();
        let whole = pending / BLOCK * BLOCK;
        if whole == 0 {
            return Ok(());
        }
        let range = self.start..self.start + whole;
        match self.file.write_all(&self.buffer[range]) {
            Ok(()) => {}
            // Some file systems accept O_DIRECT when the file is opened and refuse the write.
            Err(error) if error.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                self.stop_direct()?;
                return self.write_pending(pending);
            }
            Err(error) => return Err(self.write_error(error)),
        }
        self.consume(whole);
        Ok(())
    }

    /// Writes the first `count` pending bytes through whatever mode the file is in.
    fn write_pending(&mut self, count: usize) -> Result<()> {
        let range = self.start..self.start + count;
        if let Err(error) = self.file.write_all(&self.buffer[range]) {
            return Err(self.write_error(error));
        }
        self.consume(count);
        Ok(())
    }

    /// Forgets the first `count` pending bytes, which are written; the rest move up to
    /// `start`, still block-aligned.
    fn consume(&mut self, count: usize) {
        self.buffer.drain(self.start..self.start + count);
        self.written += count as u64;
    }

    /// A line longer than the buffer's capacity makes it grow, and the grown buffer may sit
    /// elsewhere in memory, off a block boundary: move the pending bytes to a fresh aligned
    /// buffer with room for them.
    fn realign(&mut self) {
        if (self.buffer.as_ptr() as usize + self.start).is_multiple_of(BLOCK) {
            return;
        }
        let pending = &self.buffer[self.start..];
        let (mut buffer, start) = aligned_buffer(CHUNK.max(pending.len()));
        buffer.extend_from_slice(pending);
        self.buffer = buffer;
        self.start = start;
    }

    /// Switches the file to writes through the page cache for good.
    fn stop_direct(&mut self) -> Result<()> {
        self.direct = false;
        clear_direct_flag(&self.file)
            .with_context(|| format!("cannot switch {} to buffered writes", self.path.display()))
    }

    fn write_error(&self, error: std::io::Error) -> anyhow::Error {
        anyhow::Error::new(error).context(format!("cannot write to {}", self.path.display()))
    }
}

impl Drop for LineFile {
    /// Lines of committed batches reach the file even when a run stops on an error.
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// An empty buffer with room for `capacity` bytes after the returned start offset, which is
/// on a block boundary in memory (the bytes before it are padding).
fn aligned_buffer(capacity: usize) -> (Vec<u8>, usize) {
    // Room for a chunk plus the line that crosses the chunk's end, so a typical batch never
    // makes the buffer grow and move.
    let mut buffer: Vec<u8> = Vec::with_capacity(2 * capacity + BLOCK);
    let start = buffer.as_ptr().align_offset(BLOCK);
    buffer.resize(start, 0);
    (buffer, start)
}

/// Opens `path` for writing, bypassing the page cache where the system allows it; the flag
/// says whether it does.
#[cfg(target_os = "linux")]
fn open_output(path: &Path, truncate: bool) -> std::io::Result<(File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(truncate);
    let direct = rustix::fs::OFlags::DIRECT.bits() as i32;
    match options.clone().custom_flags(direct).open(path) {
        Ok(file) => Ok((file, true)),
        Err(error) if error.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
            Ok((options.open(path)?, false))
        }
        Err(error) => Err(error),
    }
}

#[cfg(not(target_os = "linux"))]
fn open_output(path: &Path, truncate: bool) -> std::io::Result<(File, bool)> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(truncate)
        .open(path)?;
    Ok((file, false))
}

#[cfg(target_os = "linux")]
fn clear_direct_flag(file: &File) -> std::io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(file)?;
    rustix::fs::fcntl_setfl(file, flags - rustix::fs::OFlags::DIRECT)?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn clear_direct_flag(_file: &File) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record that encodes as a given text.
    struct Line(String);

    impl WriteJson for Line {
        fn write_json(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(self.0.as_bytes());
        }
    }

    /// Lines of every length from empty to well past a chunk, in batches of varying size.
    fn sample_batches() -> Vec<Vec<Line>> {
        let mut batches = Vec::new();
        for batch in 0..40usize {
            let lines = (0..batch * 7)
                .map(|i| Line(format!("{batch}-{i}-{}", "x".repeat((i * 131) % 5000))))
                .collect();
            batches.push(lines);
        }
        batches.push(vec![Line("y".repeat(3 * CHUNK + 17))]);
        batches.push(vec![
            Line(String::new()),
            Line("after the long line".into()),
        ]);
        batches
    }

    fn expected_text(batches: &[Vec<Line>]) -> Vec<u8> {
        let mut text = Vec::new();
        for line in batches.iter().flatten() {
            text.extend_from_slice(line.0.as_bytes());
            text.push(b'\n');
        }
        text
    }

    /// Writes every sample batch, through the page cache or not, and reads the file back.
    fn write_samples_and_read_back(through_page_cache: bool) -> (Vec<u8>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let batches = sample_batches();
        let mut file = LineFile::create(&path).unwrap();
        if through_page_cache && file.is_direct() {
            file.stop_direct().unwrap();
        }
        for batch in &batches {
            file.write_lines(batch).unwrap();
        }
        file.finish().unwrap();
        (std::fs::read(&path).unwrap(), expected_text(&batches))
    }

    #[test]
    fn the_file_holds_exactly_the_lines_written() {
        let (written, expected) = write_samples_and_read_back(false);
        assert_eq!(written, expected);
    }

    #[test]
    fn writes_through_the_page_cache_give_the_same_file() {
        let (written, expected) = write_samples_and_read_back(true);
        assert_eq!(written, expected);
    }

    #[test]
    fn dropping_an_unfinished_file_keeps_its_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let batches = sample_batches();
        {
            let mut file = LineFile::create(&path).unwrap();
            file.write_lines(&batches[10]).unwrap();
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            expected_text(&batches[10..11])
        );
    }

    /// Writes the sample batches with a checkpoint after each, "crashes" (the process's
    /// buffer is lost) several batches past `crash_after`, resumes at that checkpoint's
    /// length and writes the rest: the file must be as if nothing happened.
    fn crash_and_resume(through_page_cache: bool, crash_after: usize) {
        // Not in /tmp, which may be a tmpfs that refuses direct writes.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("out.jsonl");
        let batches = sample_batches();
        let mut file = LineFile::create(&path).unwrap();
        if through_page_cache && file.is_direct() {
            file.stop_direct().unwrap();
        }
        let mut lengths = Vec::new();
        for batch in &batches[..crash_after + 3] {
            file.write_lines(batch).unwrap();
            lengths.push(file.checkpoint(false).unwrap());
        }
        file.write_lines(&batches[crash_after + 3]).unwrap();
        assert_eq!(
            lengths[crash_after],
            expected_text(&batches[..=crash_after]).len() as u64
        );
        std::mem::forget(file);
        let mut file = LineFile::resume(&path, lengths[crash_after]).unwrap();
        if through_page_cache && file.is_direct() {
            file.stop_direct().unwrap();
        }
        for batch in &batches[crash_after + 1..] {
            file.write_lines(batch).unwrap();
        }
        file.finish().unwrap();
        assert!(std::fs::read(&path).unwrap() == expected_text(&batches));
    }

    #[test]
    fn a_file_resumed_at_a_checkpoint_is_as_if_it_was_never_interrupted() {
        for crash_after in [0, 5, 17, 36] {
            crash_and_resume(false, crash_after);
            crash_and_resume(true, crash_after);
        }
    }

    #[test]
    fn resuming_a_file_shorter_than_its_checkpoint_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "one line\n").unwrap();
        let message = LineFile::resume(&path, 100).err().unwrap().to_string();
        assert!(
            message.contains("holds 9 bytes, fewer than the 100"),
            "{message}"
        );
    }
}
