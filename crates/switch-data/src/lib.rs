//! `switch-data`: the text every experiment trains on, tokenized, split and made into examples
//! (T5 span corruption, the paper's objective, or a prefix LM).
//!
//! A [`Dataset`] is built once per config from a corpus (the embedded default or a user path): each
//! source is cut into chunks of about [`CHUNK_CHARS`] characters at line ends; two disjoint, evenly
//! spaced sets of `held_out_fraction` of every source's chunks form the validation and the test
//! split ([`split_of`]), and the rest the training stream. Training reads only the training
//! stream; evaluations during training read validation; the test split is scored once, at the
//! end of a run. Training batches are a pure function of `(seed, step)`, so a resumed run
//! reads exactly the batches it would have read, and the data position is just the step.
//!
//! The tokenizer and the tokenized splits are cached per corpus and vocabulary ([`cache`]),
//! with checksums: a damaged entry is rebuilt, never trusted, and a refused corpus writes none.
pub mod cache;
pub mod corpus;
pub mod span;
pub mod tokenizer;

use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use span::SpanCorruption;
use std::path::{Path, PathBuf};
pub use tokenizer::{TokenizerKind, Vocab};

/// Target size of a chunk, the unit of the train / held-out split.
pub const CHUNK_CHARS: usize = 4096;

/// A data problem: what (a path, a key), what is wrong, and what to do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{what} {problem}: {fix}")]
pub struct DataError {
    pub what: String,
    pub problem: String,
    pub fix: String,
}

impl DataError {
    pub fn new(what: &str, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { what: what.to_string(), problem: problem.into(), fix: fix.into() }
    }
}

/// What the model learns to predict from each window of text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// T5's span corruption, the paper's objective: ~15% of the window, in spans, are the targets.
    #[default]
    SpanCorruption,
    /// T5's prefix LM (its Table 4, not the paper's objective): the encoder reads `encoder_len`
    /// tokens and the decoder predicts the next `encoder_len`, so every decoder position is a
    /// target (4× span corruption's targets per example at `encoder_len` 64). The split is at
    /// the middle of the window, not at a random point, so every example has the same lengths.
    PrefixLm,
    /// A decoder-only causal LM (not the paper's objective, nor an encoder-decoder's): no encoder
    /// input; the decoder predicts every token of a window of 2 × `encoder_len` tokens (the
    /// prefix LM's window), each from the ones before it. Needs `model.num_encoder_layers: 0`.
    CausalLm,
}

/// The lengths every example of a config has (no padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lengths {
    /// Raw text tokens one example reads.
    pub raw: usize,
    pub encoder: usize,
    pub decoder: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// What the model learns to predict (default: T5's span corruption, as in the paper).
    pub objective: Objective,
    /// `default` for the embedded corpus, or a path to a text / `.jsonl` file or a folder of them.
    pub corpus: String,
    pub tokenizer: TokenizerKind,
    /// Total vocabulary including the special and sentinel tokens (ignored by the byte tokenizer).
    pub vocab_size: usize,
    pub num_sentinels: usize,
    /// Encoder (input) length; the decoder length follows from the objective (the span-corruption
    /// arithmetic, or the same length for the prefix LM).
    pub encoder_len: usize,
    pub noise_density: f64,
    pub mean_noise_span_len: f64,
    /// Fraction of every source's chunks in the validation split, and again in the test split.
    pub held_out_fraction: f64,
    /// Examples of each evaluation (validation during training, test at the end).
    pub eval_examples: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            objective: Objective::SpanCorruption,
            corpus: "default".into(),
            tokenizer: TokenizerKind::Bpe,
            vocab_size: 4096,
            num_sentinels: 100,
            encoder_len: 128,
            noise_density: 0.15,
            mean_noise_span_len: 3.0,
            held_out_fraction: 0.02,
            eval_examples: 256,
        }
    }
}

impl DataConfig {
    /// Vocabulary size the model must have.
    pub fn model_vocab_size(&self) -> usize {
        match self.tokenizer {
            TokenizerKind::Bpe => self.vocab_size,
            TokenizerKind::Byte => tokenizer::byte_vocab_size(self.num_sentinels),
        }
    }

    pub fn span_corruption(&self) -> Result<SpanCorruption, DataError> {
        if !(self.noise_density > 0.0 && self.noise_density < 1.0) {
            return Err(DataError::new(
                "data.noise_density",
                format!("= {} is out of range", self.noise_density),
                "use a value in (0, 1), T5's is 0.15",
            ));
        }
        if self.mean_noise_span_len.is_nan() || self.mean_noise_span_len < 1.0 {
            return Err(DataError::new(
                "data.mean_noise_span_len",
                format!("= {} is out of range", self.mean_noise_span_len),
                "use a value ≥ 1, T5's is 3",
            ));
        }
        let sc = SpanCorruption::for_encoder_len(self.encoder_len, self.noise_density, self.mean_noise_span_len)
            .map_err(|e| DataError::new("data.encoder_len", e, "choose one of the nearest lengths"))?;
        if sc.num_spans > self.num_sentinels {
            return Err(DataError::new(
                "data.num_sentinels",
                format!("= {} is fewer than the {} spans per example", self.num_sentinels, sc.num_spans),
                format!("set it to at least {}", sc.num_spans),
            ));
        }
        Ok(sc)
    }

    /// The lengths of every example, checking the settings the objective uses.
    pub fn lengths(&self) -> Result<Lengths, DataError> {
        match self.objective {
            Objective::SpanCorruption => {
                let sc = self.span_corruption()?;
                Ok(Lengths { raw: sc.raw_len, encoder: sc.encoder_len, decoder: sc.decoder_len })
            }
            Objective::PrefixLm | Objective::CausalLm if self.encoder_len < 1 => {
                Err(DataError::new("data.encoder_len", "= 0", "use at least 1 token (the window is 2 × encoder_len)"))
            }
            Objective::PrefixLm => {
                Ok(Lengths { raw: 2 * self.encoder_len, encoder: self.encoder_len, decoder: self.encoder_len })
            }
            Objective::CausalLm => Ok(Lengths { raw: 2 * self.encoder_len, encoder: 0, decoder: 2 * self.encoder_len }),
        }
    }

    pub fn validate(&self) -> Result<(), DataError> {
        self.lengths()?;
        if self.tokenizer == TokenizerKind::Bpe && self.vocab_size < tokenizer::byte_vocab_size(self.num_sentinels) {
            return Err(DataError::new(
                "data.vocab_size",
                format!(
                    "= {} is smaller than the 256 byte symbols plus {} special tokens",
                    self.vocab_size,
                    self.num_sentinels + 2
                ),
                format!("use at least {}", tokenizer::byte_vocab_size(self.num_sentinels)),
            ));
        }
        if !(self.held_out_fraction > 0.0 && self.held_out_fraction <= 0.25) {
            return Err(DataError::new(
                "data.held_out_fraction",
                format!("= {}", self.held_out_fraction),
                "use a value in (0, 0.25] (validation and test each take this fraction)",
            ));
        }
        if self.eval_examples == 0 {
            return Err(DataError::new("data.eval_examples", "= 0", "use at least 1"));
        }
        Ok(())
    }
}

/// Cuts text into chunks of about `CHUNK_CHARS` characters, ending at line ends.
fn chunks(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + CHUNK_CHARS).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        if end < text.len() {
            if let Some(nl) = text[end..].find('\n') {
                end += nl + 1;
            } else {
                end = text.len();
            }
        }
        out.push(&text[start..end]);
        start = end;
    }
    out
}

/// The three disjoint splits of every corpus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    /// Read by every evaluation during training and by every choice of settings.
    Validation,
    /// Scored once, at the end of a run; nothing is chosen on it.
    Test,
}

/// Whether `x` crosses an evenly spaced mark of density `fraction` at `phase` in (i, i + 1].
fn crosses(i: usize, fraction: f64, phase: f64) -> bool {
    let f = |x: f64| (x * fraction + phase).floor();
    f((i + 1) as f64) > f(i as f64)
}

/// The split of chunk `i` of a source: validation and test chunks are each an evenly spaced
/// `fraction` of the source (validation at the middle of each stride of 1 / `fraction` chunks,
/// test a quarter stride later), the rest is training text. Disjoint for `fraction` ≤ 1/4.
pub fn split_of(i: usize, fraction: f64) -> Split {
    if crosses(i, fraction, 0.5) {
        Split::Validation
    } else if crosses(i, fraction, 0.25) {
        Split::Test
    } else {
        Split::Train
    }
}

/// FNV-1a, 64 bit: a stable hash for cache keys and run ids (the same on every machine).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// Chunks of a corpus by split: train, validation, test.
type SplitTexts<'a> = [Vec<&'a str>; 3];

/// The chunks of every source by split, and per source (name, chunks, of which validation, of
/// which test).
fn split_sources(sources: &[corpus::Source], fraction: f64) -> (SplitTexts<'_>, Vec<(String, usize, usize, usize)>) {
    let mut texts = SplitTexts::default();
    let mut summary = Vec::new();
    for s in sources {
        let cs = chunks(&s.text);
        let count = |want| (0..cs.len()).filter(|&i| split_of(i, fraction) == want).count();
        summary.push((s.name.clone(), cs.len(), count(Split::Validation), count(Split::Test)));
        for (i, c) in cs.into_iter().enumerate() {
            texts[split_of(i, fraction) as usize].push(c);
        }
    }
    (texts, summary)
}

/// Refuses splits too small to use: `sizes` (train, validation, test) in `unit`s, bytes before
/// tokenizing (an upper bound on tokens) and tokens after. Training needs room for random
/// windows, each held-out split `eval_examples` windows.
fn check_split_sizes(
    what: &str,
    cfg: &DataConfig,
    lengths: Lengths,
    sizes: [usize; 3],
    unit: &str,
) -> Result<(), DataError> {
    let [train, validation, test] = sizes;
    let needed = cfg.eval_examples * lengths.raw;
    for (name, size) in [("validation", validation), ("test", test)] {
        if size < needed {
            return Err(DataError::new(
                what,
                format!(
                    "gives a {name} split of {size} {unit}; {} examples of {} raw tokens need {needed} tokens",
                    cfg.eval_examples, lengths.raw
                ),
                "add text, raise data.held_out_fraction or lower data.eval_examples",
            ));
        }
    }
    if train < lengths.raw * 8 {
        return Err(DataError::new(
            what,
            format!(
                "gives a training split of {train} {unit}, too few for batches of {}-token windows (at least {} tokens)",
                lengths.raw,
                lengths.raw * 8
            ),
            "add text or lower data.encoder_len",
        ));
    }
    Ok(())
}

/// The cache entry of a corpus and vocabulary: its texts, tokenizer settings and split.
fn cache_key(cfg: &DataConfig, sources: &[corpus::Source]) -> String {
    let corpus_hash =
        sources.iter().fold(fnv1a(cfg.corpus.as_bytes()), |h, s| h ^ fnv1a(s.text.as_bytes()).rotate_left(7));
    let key = format!(
        "{corpus_hash}-{:?}-{}-{}-{}-{}-train/validation/test",
        cfg.tokenizer, cfg.vocab_size, cfg.num_sentinels, CHUNK_CHARS, cfg.held_out_fraction
    );
    format!("{:016x}", fnv1a(key.as_bytes()))
}

/// Tokenized training stream and held-out examples, ready for batching.
pub struct Dataset {
    pub vocab: Vocab,
    pub lengths: Lengths,
    /// The span-corruption setting; `None` for the prefix and causal LMs.
    pub spans: Option<SpanCorruption>,
    pub train_tokens: Vec<u32>,
    pub validation_tokens: Vec<u32>,
    pub test_tokens: Vec<u32>,
    /// (source name, chunks, of which validation, of which test): for reports and tests.
    pub split_summary: Vec<(String, usize, usize, usize)>,
    eval_examples: usize,
}

impl Dataset {
    /// Loads, splits and tokenizes, or reads the tokenizer and splits cached in `cache_dir`
    /// (see [`cache`]). Every check that can refuse the corpus runs before anything is written
    /// there, so a refused corpus leaves no cache entry behind.
    pub fn build(cfg: &DataConfig, cache_dir: &Path) -> Result<Self, DataError> {
        cfg.validate()?;
        let lengths = cfg.lengths()?;
        let spans = match cfg.objective {
            Objective::SpanCorruption => Some(cfg.span_corruption()?),
            Objective::PrefixLm | Objective::CausalLm => None,
        };
        let sources = if cfg.corpus == "default" { corpus::embedded() } else { corpus::load(Path::new(&cfg.corpus))? };
        let (texts, split_summary) = split_sources(&sources, cfg.held_out_fraction);
        let what = if cfg.corpus == "default" { "the default corpus".to_string() } else { cfg.corpus.clone() };
        // A token covers at least one byte, so text shorter than a split needs in tokens cannot
        // fill it: refuse before training a tokenizer.
        let bytes = texts.each_ref().map(|t| t.iter().map(|c| c.len()).sum());
        check_split_sizes(&what, cfg, lengths, bytes, "bytes")?;
        let dir: PathBuf = cache_dir.join(format!("data-{}", cache_key(cfg, &sources)));
        let (vocab, tokens, cached) = match cache::load(cfg, &dir) {
            Some((vocab, tokens)) => (vocab, tokens, true),
            None => {
                let [train, validation, test] = &texts;
                let vocab = Vocab::train(cfg, train)?;
                let tokens =
                    [vocab.encode_chunks(train)?, vocab.encode_chunks(validation)?, vocab.encode_chunks(test)?];
                (vocab, tokens, false)
            }
        };
        // Checked on a cache hit too: the cache key leaves out encoder_len and eval_examples.
        check_split_sizes(&what, cfg, lengths, tokens.each_ref().map(|t| t.len()), "tokens")?;
        if !cached {
            cache::store(&dir, &vocab, &tokens)?;
        }
        let [train_tokens, validation_tokens, test_tokens] = tokens;
        Ok(Self {
            vocab,
            lengths,
            spans,
            train_tokens,
            validation_tokens,
            test_tokens,
            split_summary,
            eval_examples: cfg.eval_examples,
        })
    }

    /// (inputs, targets) of one window of `lengths.raw` tokens.
    fn example(&self, raw: &[u32], rng: &mut StdRng) -> (Vec<u32>, Vec<u32>) {
        match &self.spans {
            Some(sc) => sc.corrupt(raw, &self.vocab.sentinels(), Vocab::EOS, rng),
            // The prefix LM splits the window in the middle; the causal LM (encoder length 0)
            // predicts all of it.
            None => {
                let (prefix, continuation) = raw.split_at(self.lengths.encoder);
                (prefix.to_vec(), continuation.to_vec())
            }
        }
    }

    /// Training batch number `step` of a run with `seed`: random windows of the training stream.
    pub fn train_batch(&self, seed: u64, step: u64, batch_size: usize) -> Example {
        let mut rng = StdRng::seed_from_u64(fnv1a(format!("train-{seed}-{step}").as_bytes()));
        let raw = self.lengths.raw;
        let examples = (0..batch_size)
            .map(|_| {
                let start = rng.gen_range(0..=self.train_tokens.len() - raw);
                self.example(&self.train_tokens[start..start + raw], &mut rng)
            })
            .collect();
        Example::stack(examples)
    }

    /// The examples of a held-out split ([`Split::Validation`] or [`Split::Test`]): evenly
    /// spaced, non-overlapping windows with fixed noise masks, the same for every run and seed;
    /// split into batches of `batch_size`.
    pub fn eval_batches(&self, split: Split, batch_size: usize) -> Vec<Example> {
        let (tokens, salt): (&[u32], &[u8]) = match split {
            Split::Validation => (&self.validation_tokens, b"held-out"),
            Split::Test => (&self.test_tokens, b"test"),
            Split::Train => panic!("eval_batches reads a held-out split, not the training stream"),
        };
        let raw = self.lengths.raw;
        let n = self.eval_examples;
        let stride = (tokens.len() - raw) / n.max(2).saturating_sub(1).max(1);
        let mut rng = StdRng::seed_from_u64(fnv1a(salt));
        let examples: Vec<_> = (0..n)
            .map(|j| {
                let s = (j * stride).min(tokens.len() - raw);
                self.example(&tokens[s..s + raw], &mut rng)
            })
            .collect();
        examples.chunks(batch_size).map(|c| Example::stack(c.to_vec())).collect()
    }
}

/// A batch of examples as flat row-major id vectors (no padding: all examples have equal lengths).
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub batch_size: usize,
    pub encoder_ids: Vec<usize>,
    /// Targets shifted right behind the start token [`Vocab::PAD`].
    pub decoder_input_ids: Vec<usize>,
    pub targets: Vec<usize>,
}

impl Example {
    fn stack(examples: Vec<(Vec<u32>, Vec<u32>)>) -> Self {
        let mut out =
            Example { batch_size: examples.len(), encoder_ids: vec![], decoder_input_ids: vec![], targets: vec![] };
        for (inputs, targets) in examples {
            out.encoder_ids.extend(inputs.iter().map(|&t| t as usize));
            out.decoder_input_ids.push(Vocab::PAD as usize);
            out.decoder_input_ids.extend(targets[..targets.len() - 1].iter().map(|&t| t as usize));
            out.targets.extend(targets.iter().map(|&t| t as usize));
        }
        out
    }
}
