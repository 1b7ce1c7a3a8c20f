//! Byte-level BPE (Hugging Face `tokenizers`, trained on the training split and cached on disk)
//! or plain bytes. Ids 0 and 1 are `<pad>` (also the decoder start) and `</s>`, then the
//! span-corruption sentinels `<extra_id_0>`, `<extra_id_1>`, …
use crate::{DataConfig, DataError};
use serde::{Deserialize, Serialize};
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

    /// The byte tokenizer: no training, nothing cached.
    pub fn byte(num_sentinels: usize) -> Self {
        Self { bpe: None, num_sentinels, size: byte_vocab_size(num_sentinels) }
    }

    /// The configured tokenizer, BPE trained on `train_text` in memory: the cache is written
    /// only once every check on the corpus has passed (see [`crate::cache::store`]).
    pub fn train(cfg: &DataConfig, train_text: &[&str]) -> Result<Self, DataError> {
        if cfg.tokenizer == TokenizerKind::Byte {
            return Ok(Self::byte(cfg.num_sentinels));
        }
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
        // Through JSON and back, so this run encodes with exactly the tokenizer later runs load.
        let json =
            t.to_string(false).map_err(|e| DataError::new("tokenizer", e.to_string(), "report this as a bug"))?;
        Self::from_json(cfg, json.as_bytes())
            .map_err(|e| DataError::new("the trained tokenizer", e, "report this as a bug"))
    }

    /// A BPE tokenizer from its JSON, if it parses and fits in `cfg.vocab_size`.
    pub(crate) fn from_json(cfg: &DataConfig, json: &[u8]) -> Result<Self, String> {
        let tokenizer = Tokenizer::from_bytes(json).map_err(|e| format!("is not a tokenizer ({e})"))?;
        let size = tokenizer.get_vocab_size(true);
        if size > cfg.vocab_size {
            return Err(format!("has {size} entries, more than data.vocab_size = {}", cfg.vocab_size));
        }
        // A small corpus can end BPE training early; the model keeps the configured size.
        Ok(Self { bpe: Some(tokenizer), num_sentinels: cfg.num_sentinels, size: cfg.vocab_size })
    }

    /// The BPE tokenizer as JSON, to cache; `None` for the byte tokenizer.
    pub(crate) fn to_json(&self) -> Result<Option<String>, DataError> {
        self.bpe
            .as_ref()
            .map(|t| t.to_string(false).map_err(|e| DataError::new("tokenizer", e.to_string(), "report this as a bug")))
            .transpose()
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
