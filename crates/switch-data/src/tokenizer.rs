//! Byte-level BPE (Hugging Face `tokenizers`, trained on the training split and cached on disk)
//! or plain bytes. Ids 0 and 1 are `<pad>` (also the decoder start) and `</s>`, then the
//! span-corruption sentinels `<extra_id_0>`, `<extra_id_1>`, …
use crate::{DataConfig, DataError};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    Bpe,
    Byte,
}

pub fn byte_vocab_size(num_sentinels: usize) -> usize {
    2 + num_sentinels + 256
}

pub struct Vocab {
    bpe: Option<Tokenizer>,
    pub num_sentinels: usize,
    pub size: usize,
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

/// Token ids cached as little-endian u32 at `path`, computed by `make` on a miss.
pub(crate) fn cached_ids(
    path: &Path,
    make: impl FnOnce() -> Result<Vec<u32>, DataError>,
) -> Result<Vec<u32>, DataError> {
    if let Ok(bytes) = std::fs::read(path) {
        return Ok(bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect());
    }
    let ids = make()?;
    let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    write_atomic(path, &bytes)?;
    Ok(ids)
}

impl Vocab {
    pub const PAD: u32 = 0;
    pub const EOS: u32 = 1;

    pub fn sentinels(&self) -> Vec<u32> {
        (0..self.num_sentinels as u32).map(|i| 2 + i).collect()
    }

    fn special_tokens(num_sentinels: usize) -> Vec<AddedToken> {
        let mut v = vec![AddedToken::from("<pad>", true), AddedToken::from("</s>", true)];
        v.extend((0..num_sentinels).map(|i| AddedToken::from(format!("<extra_id_{i}>"), true)));
        v
    }

    /// The byte tokenizer, or the BPE tokenizer cached in `dir` (trained on `train_text` on a miss).
    pub fn load_or_train(cfg: &DataConfig, dir: &Path, train_text: &[&str]) -> Result<Self, DataError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        if cfg.tokenizer == TokenizerKind::Byte {
            return Ok(Self { bpe: None, num_sentinels: cfg.num_sentinels, size: byte_vocab_size(cfg.num_sentinels) });
        }
        let path = dir.join("tokenizer.json");
        let tokenizer = match Tokenizer::from_file(&path) {
            Ok(t) => t,
            Err(_) => {
                let mut trainer = BpeTrainerBuilder::new()
                    .vocab_size(cfg.vocab_size)
                    .min_frequency(2)
                    .show_progress(false)
                    .special_tokens(Self::special_tokens(cfg.num_sentinels))
                    .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                    .build();
                let mut t = TokenizerBuilder::new()
                    .with_model(BPE::default())
                    .with_normalizer(None::<NormalizerWrapper>)
                    .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
                    .with_post_processor(None::<ByteLevel>)
                    .with_decoder(Some(ByteLevel::default().add_prefix_space(false)))
                    .build()
                    .map_err(|e| DataError::new("tokenizer", e.to_string(), "report this as a bug"))?;
                t.train(&mut trainer, train_text.iter().copied())
                    .map_err(|e| DataError::new("tokenizer training", e.to_string(), "check the corpus"))?;
                let json = t.to_string(false).map_err(|e| io_err(&path, e))?;
                write_atomic(&path, json.as_bytes())?;
                Tokenizer::from_file(&path).map_err(|e| io_err(&path, e))?
            }
        };
        let size = tokenizer.get_vocab_size(true);
        if size > cfg.vocab_size {
            return Err(DataError::new(
                "data.vocab_size",
                format!("= {} but the trained tokenizer has {size} entries", cfg.vocab_size),
                "report this as a bug",
            ));
        }
        // A small corpus can end BPE training early; the model keeps the configured size.
        Ok(Self { bpe: Some(tokenizer), num_sentinels: cfg.num_sentinels, size: cfg.vocab_size })
    }

    pub fn encode(&self, text: &str) -> Vec<u32> {
        match &self.bpe {
            Some(t) => t.encode(text, false).expect("BPE encodes any string").get_ids().to_vec(),
            None => text.bytes().map(|b| 2 + self.num_sentinels as u32 + b as u32).collect(),
        }
    }

    pub(crate) fn encode_chunks(&self, chunks: &[&str]) -> Result<Vec<u32>, DataError> {
        match &self.bpe {
            Some(t) => {
                let encs = t
                    .encode_batch(chunks.to_vec(), false)
                    .map_err(|e| DataError::new("tokenizer", e.to_string(), "check the corpus"))?;
                Ok(encs.iter().flat_map(|e| e.get_ids().iter().copied()).collect())
            }
            None => Ok(chunks.iter().flat_map(|c| self.encode(c)).collect()),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        match &self.bpe {
            Some(t) => t.decode(ids, false).expect("ids come from this tokenizer"),
            None => {
                let first = 2 + self.num_sentinels as u32;
                let bytes: Vec<u8> = ids.iter().filter(|&&i| i >= first).map(|&i| (i - first) as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
        }
    }
}
