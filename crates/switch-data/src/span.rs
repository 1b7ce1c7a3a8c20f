//! T5 span corruption (`random_spans_noise_mask` and `random_spans_helper` of the T5 code base).
//!
//! ```
//! use switch_data::span::SpanCorruption;
//! use rand::{rngs::StdRng, SeedableRng};
//! // T5's default: inputs of 512 come from 568 raw tokens and give targets of 114.
//! let sc = SpanCorruption::for_encoder_len(512, 0.15, 3.0).unwrap();
//! assert_eq!((sc.raw_len, sc.encoder_len, sc.decoder_len), (568, 512, 114));
//! let raw: Vec<u32> = (1000..1568).collect();
//! let sentinels: Vec<u32> = (2..102).collect();
//! let (inputs, targets) = sc.corrupt(&raw, &sentinels, 1, &mut StdRng::seed_from_u64(0));
//! assert_eq!((inputs.len(), targets.len()), (512, 114));
//! ```
use rand::{rngs::StdRng, seq::SliceRandom};

/// Lengths of one span-corruption setting; all examples have exactly these lengths.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpanCorruption {
    pub noise_density: f64,
    pub mean_span_len: f64,
    /// Raw tokens consumed per example.
    pub raw_len: usize,
    pub num_noise_tokens: usize,
    pub num_spans: usize,
    /// Non-noise tokens + one sentinel per span + EOS.
    pub encoder_len: usize,
    /// Noise tokens + one sentinel per span + EOS.
    pub decoder_len: usize,
}

impl SpanCorruption {
    fn from_raw_len(raw_len: usize, noise_density: f64, mean_span_len: f64) -> Self {
        let num_noise_tokens = ((raw_len as f64 * noise_density).round() as usize).clamp(1, raw_len - 1);
        let num_spans = ((num_noise_tokens as f64 / mean_span_len).round() as usize).max(1);
        Self {
            noise_density,
            mean_span_len,
            raw_len,
            num_noise_tokens,
            num_spans,
            encoder_len: raw_len - num_noise_tokens + num_spans + 1,
            decoder_len: num_noise_tokens + num_spans + 1,
        }
    }

    /// The longest raw length whose inputs are exactly `encoder_len` tokens (T5's
    /// `random_spans_helper`). Some lengths cannot be hit exactly; the error names the nearest ones.
    pub fn for_encoder_len(encoder_len: usize, noise_density: f64, mean_span_len: f64) -> Result<Self, String> {
        if encoder_len < 4 {
            return Err(format!("encoder length {encoder_len} is too short: use at least 4"));
        }
        let fits: Vec<Self> = (2..encoder_len * 3)
            .map(|raw| Self::from_raw_len(raw, noise_density, mean_span_len))
            .filter(|s| s.encoder_len <= encoder_len + 1)
            .collect();
        match fits.iter().rev().find(|s| s.encoder_len == encoder_len) {
            Some(s) => Ok(*s),
            None => {
                let near: Vec<usize> =
                    fits.iter().rev().map(|s| s.encoder_len).filter(|&l| l != encoder_len).take(2).collect();
                Err(format!("no raw length gives exactly {encoder_len} encoder tokens at noise density {noise_density}; nearest: {near:?}"))
            }
        }
    }

    /// Splits `num_items` into `num_segments` non-empty runs, uniformly at random (T5's `_random_segmentation`).
    fn random_segmentation(num_items: usize, num_segments: usize, rng: &mut StdRng) -> Vec<usize> {
        let mut first: Vec<bool> = (0..num_items - 1).map(|i| i < num_segments - 1).collect();
        first.shuffle(rng);
        let mut lens = vec![0usize; num_segments];
        let mut seg = 0;
        lens[0] = 1;
        for starts_new in first {
            if starts_new {
                seg += 1;
            }
            lens[seg] += 1;
        }
        lens
    }

    /// The noise mask of one example: spans alternate non-noise, noise, non-noise, …, noise.
    pub fn noise_mask(&self, rng: &mut StdRng) -> Vec<bool> {
        let noise = Self::random_segmentation(self.num_noise_tokens, self.num_spans, rng);
        let keep = Self::random_segmentation(self.raw_len - self.num_noise_tokens, self.num_spans, rng);
        let mut mask = Vec::with_capacity(self.raw_len);
        for (k, n) in keep.into_iter().zip(noise) {
            mask.extend(std::iter::repeat_n(false, k));
            mask.extend(std::iter::repeat_n(true, n));
        }
        mask
    }

    /// Corrupts `raw` (exactly `raw_len` tokens): each noise span becomes one sentinel in the
    /// inputs and is listed after that sentinel in the targets; both end with `eos`.
    pub fn corrupt(&self, raw: &[u32], sentinels: &[u32], eos: u32, rng: &mut StdRng) -> (Vec<u32>, Vec<u32>) {
        assert_eq!(raw.len(), self.raw_len, "span corruption needs exactly raw_len tokens");
        assert!(sentinels.len() >= self.num_spans, "need {} sentinels, have {}", self.num_spans, sentinels.len());
        let mask = self.noise_mask(rng);
        let (mut inputs, mut targets) = (Vec::with_capacity(self.encoder_len), Vec::with_capacity(self.decoder_len));
        let mut span = 0;
        for (i, (&tok, &noisy)) in raw.iter().zip(&mask).enumerate() {
            let starts_span = noisy && (i == 0 || !mask[i - 1]);
            if starts_span {
                inputs.push(sentinels[span]);
                targets.push(sentinels[span]);
                span += 1;
            }
            if noisy {
                targets.push(tok);
            } else {
                inputs.push(tok);
            }
        }
        inputs.push(eos);
        targets.push(eos);
        (inputs, targets)
    }
}
