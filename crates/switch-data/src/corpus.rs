//! Raw text: the embedded default corpus and user corpora (text file, folder, JSONL).
use crate::DataError;
use std::io::Read;
use std::path::{Path, PathBuf};

/// One source text (a book, a corpus file, a JSONL record…).
#[derive(Clone, Debug)]
pub struct Source {
    pub name: String,
    pub text: String,
}

/// The four public-domain texts shipped in `data/corpus/` (provenance in its `SOURCES.md`),
/// compiled into the binary so a sweep runs from any folder with no network.
const EMBEDDED: [(&str, &[u8]); 4] = [
    ("shakespeare", include_bytes!("../../../data/corpus/shakespeare.txt.gz")),
    ("austen", include_bytes!("../../../data/corpus/austen.txt.gz")),
    ("kjv", include_bytes!("../../../data/corpus/kjv.txt.gz")),
    ("brown", include_bytes!("../../../data/corpus/brown.txt.gz")),
];

fn gunzip(bytes: &[u8], what: &str) -> Result<Vec<u8>, DataError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| DataError::new(what, format!("is not valid gzip ({e})"), "re-create it with `gzip`"))?;
    Ok(out)
}

fn utf8(bytes: Vec<u8>, what: &str) -> Result<String, DataError> {
    String::from_utf8(bytes).map_err(|e| {
        DataError::new(
            what,
            format!("is not UTF-8 (invalid byte at offset {})", e.utf8_error().valid_up_to()),
            "convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8`",
        )
    })
}

pub fn embedded() -> Vec<Source> {
    EMBEDDED
        .iter()
        .map(|(name, gz)| Source {
            name: name.to_string(),
            text: utf8(gunzip(gz, name).expect("embedded corpus is valid gzip"), name)
                .expect("embedded corpus is UTF-8"),
        })
        .collect()
}

/// Writes the first `chars` characters of each embedded text to `dir/<name>.txt`: a small real
/// corpus for quick experiments and tests. Returns `dir`.
pub fn write_excerpt(dir: &Path, chars: usize) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    for s in embedded() {
        let end = s.text.char_indices().nth(chars).map(|(i, _)| i).unwrap_or(s.text.len());
        std::fs::write(dir.join(format!("{}.txt", s.name)), &s.text[..end])?;
    }
    Ok(dir.to_path_buf())
}

fn read_file(path: &Path) -> Result<Vec<Source>, DataError> {
    let what = path.display().to_string();
    let bytes = std::fs::read(path)
        .map_err(|e| DataError::new(&what, format!("cannot be read ({e})"), "check the path in data.corpus"))?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") { gunzip(&bytes, &what)? } else { bytes };
    let text = utf8(bytes, &what)?;
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let is_jsonl = name.trim_end_matches(".gz").ends_with(".jsonl");
    let sources = if is_jsonl {
        let mut docs = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                DataError::new(
                    &format!("{what}:{}", i + 1),
                    format!("is not JSON ({e})"),
                    "write one JSON object per line",
                )
            })?;
            let text = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
                DataError::new(
                    &format!("{what}:{}", i + 1),
                    "has no string field `text`",
                    "give every record a \"text\" field",
                )
            })?;
            docs.push(text.to_string());
        }
        // One source per file: records are joined so the held-out split samples across the file.
        vec![Source { name, text: docs.join("\n\n") }]
    } else {
        vec![Source { name, text }]
    };
    if sources.iter().all(|s| s.text.trim().is_empty()) {
        return Err(DataError::new(&what, "is empty", "point data.corpus at a file with text in it"));
    }
    Ok(sources)
}

/// Loads a user corpus: a UTF-8 text file (optionally `.gz`), a `.jsonl` file with a `text`
/// field per line, or a folder of such files (each file one source).
pub fn load(path: &Path) -> Result<Vec<Source>, DataError> {
    let what = path.display().to_string();
    if !path.exists() {
        return Err(DataError::new(
            &what,
            "does not exist",
            "fix data.corpus, or use `corpus: default` for the embedded texts",
        ));
    }
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| DataError::new(&what, format!("cannot be listed ({e})"), "check its permissions"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(DataError::new(&what, "holds no files", "put .txt, .txt.gz or .jsonl files in it"));
        }
        let mut all = Vec::new();
        for f in files {
            all.extend(read_file(&f)?);
        }
        Ok(all)
    } else {
        read_file(path)
    }
}
