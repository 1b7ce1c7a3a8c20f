//! The on-disk cache of a tokenized corpus: one folder per corpus and vocabulary holding the BPE
//! tokenizer (`tokenizer.json`), the three splits as little-endian u32 ids (`train.u32`,
//! `validation.u32`, `test.u32`) and, written last, [`CHECKSUMS`]: each file's length and FNV-1a
//! hash. An entry is used only when every file matches its checksum and every id is in the
//! vocabulary. Anything else (a damaged or truncated file, an interrupted write, an entry from
//! before checksums) is reported and rebuilt from the corpus: a bad id would otherwise index past
//! the model's embedding table, far from its cause.
use crate::tokenizer::{TokenizerKind, Vocab};
use crate::{fnv1a, DataConfig, DataError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The checksum file of an entry; an entry without one is incomplete.
pub const CHECKSUMS: &str = "checksums.json";
const TOKENIZER: &str = "tokenizer.json";
/// The files of the three splits, in [`Splits`] order.
pub const SPLIT_FILES: [&str; 3] = ["train.u32", "validation.u32", "test.u32"];

/// Token ids of the train, validation and test splits.
pub type Splits = [Vec<u32>; 3];

#[derive(Serialize, Deserialize)]
struct Checksums {
    files: Vec<FileSum>,
}

#[derive(Serialize, Deserialize, PartialEq)]
struct FileSum {
    name: String,
    bytes: u64,
    /// FNV-1a 64 as 16 hex digits.
    fnv1a: String,
}

impl FileSum {
    fn of(name: &str, bytes: &[u8]) -> Self {
        Self { name: name.to_string(), bytes: bytes.len() as u64, fnv1a: format!("{:016x}", fnv1a(bytes)) }
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::new(
        &path.display().to_string(),
        format!("cannot be written or read ({e})"),
        "check that the cache folder is writable",
    )
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers never see half a file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path)).map_err(|e| io_err(path, e))
}

/// The vocabulary and splits cached in `dir`, or `None` to rebuild them: silently when there is
/// no entry yet, after a warning naming the file when the entry cannot be trusted.
pub fn load(cfg: &DataConfig, dir: &Path) -> Option<(Vocab, Splits)> {
    if !dir.exists() {
        return None;
    }
    match verified_entry(cfg, dir) {
        Ok(entry) => Some(entry),
        Err(why) => {
            eprintln!("warning: token cache {why}; rebuilding the entry {} from the corpus", dir.display());
            None
        }
    }
}

/// The entry in `dir` if every file matches its checksum and every id is in the vocabulary;
/// otherwise which file is wrong, and how.
fn verified_entry(cfg: &DataConfig, dir: &Path) -> Result<(Vocab, Splits), String> {
    let path = dir.join(CHECKSUMS);
    let text = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            format!("{} is missing (an entry from before checksums, or a write cut short)", path.display())
        }
        _ => format!("{} cannot be read ({e})", path.display()),
    })?;
    let sums: Checksums =
        serde_json::from_slice(&text).map_err(|e| format!("{} is not a checksum list ({e})", path.display()))?;
    let vocab = match cfg.tokenizer {
        TokenizerKind::Byte => Vocab::byte(cfg.num_sentinels),
        TokenizerKind::Bpe => Vocab::from_json(cfg, &checked_bytes(dir, &sums, TOKENIZER)?)
            .map_err(|e| format!("{} {e}", dir.join(TOKENIZER).display()))?,
    };
    let mut splits = Splits::default();
    for (ids, name) in splits.iter_mut().zip(SPLIT_FILES) {
        *ids = ids_in_vocab(&dir.join(name), &checked_bytes(dir, &sums, name)?, vocab.size)?;
    }
    Ok((vocab, splits))
}

/// The bytes of `dir/name`, if they have the length and hash that `sums` records for it.
fn checked_bytes(dir: &Path, sums: &Checksums, name: &str) -> Result<Vec<u8>, String> {
    let path = dir.join(name);
    let want = sums
        .files
        .iter()
        .find(|f| f.name == name)
        .ok_or_else(|| format!("{} has no checksum in {CHECKSUMS}", path.display()))?;
    let bytes = std::fs::read(&path).map_err(|e| format!("{} cannot be read ({e})", path.display()))?;
    let got = FileSum::of(name, &bytes);
    if got.bytes != want.bytes {
        return Err(format!("{} has {} bytes where its checksum records {}", path.display(), got.bytes, want.bytes));
    }
    if got != *want {
        return Err(format!("{} has FNV-1a {} where its checksum records {}", path.display(), got.fnv1a, want.fnv1a));
    }
    Ok(bytes)
}

/// The ids in `bytes` (little-endian u32), if they fill whole ids and all are below `vocab_size`.
fn ids_in_vocab(path: &Path, bytes: &[u8], vocab_size: usize) -> Result<Vec<u32>, String> {
    let words = bytes.chunks_exact(4);
    if !words.remainder().is_empty() {
        return Err(format!("{} has {} bytes, not a whole number of u32 ids", path.display(), bytes.len()));
    }
    let ids: Vec<u32> = words.map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    match ids.iter().position(|&id| id as usize >= vocab_size) {
        Some(i) => Err(format!(
            "{} holds id {} at position {i}, outside the vocabulary of {vocab_size}",
            path.display(),
            ids[i]
        )),
        None => Ok(ids),
    }
}

/// Writes an entry: its files, then their checksums, each atomically. The old checksums go
/// first, so a rewrite cut short leaves an entry that fails verification rather than one that
/// pairs old checksums with new files.
pub fn store(dir: &Path, vocab: &Vocab, splits: &Splits) -> Result<(), DataError> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let sums_path = dir.join(CHECKSUMS);
    match std::fs::remove_file(&sums_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&sums_path, e)),
        _ => {}
    }
    let mut files = Vec::new();
    if let Some(json) = vocab.to_json()? {
        write_atomic(&dir.join(TOKENIZER), json.as_bytes())?;
        files.push(FileSum::of(TOKENIZER, json.as_bytes()));
    }
    for (name, ids) in SPLIT_FILES.into_iter().zip(splits) {
        let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        write_atomic(&dir.join(name), &bytes)?;
        files.push(FileSum::of(name, &bytes));
    }
    let json = serde_json::to_string_pretty(&Checksums { files }).expect("checksums serialize");
    write_atomic(&sums_path, json.as_bytes())
}
