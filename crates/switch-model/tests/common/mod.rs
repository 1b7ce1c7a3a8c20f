//! Helpers shared by the model's test binaries (each uses some of them).
#![allow(dead_code)]
use rand::{rngs::StdRng, Rng, SeedableRng};
use switch_model::{Batch, ModelConfig};

/// A batch of `b` random examples, `le` encoder and `ld` decoder tokens each.
pub fn batch(cfg: &ModelConfig, b: usize, le: usize, ld: usize, seed: u64) -> Batch {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ids = |n: usize| (0..n).map(|_| rng.gen_range(0..cfg.vocab_size)).collect::<Vec<_>>();
    let targets = ids(b * ld);
    let mut dec = Vec::new();
    for r in 0..b {
        dec.push(0);
        dec.extend_from_slice(&targets[r * ld..(r + 1) * ld - 1]);
    }
    Batch { batch_size: b, encoder_len: le, decoder_len: ld, encoder_ids: ids(b * le), decoder_input_ids: dec, targets }
}

/// Resident memory of this process, from /proc/self/status (0 where it cannot be read).
pub fn resident_bytes() -> u64 {
    switch_model::procfs::resident_bytes()
}
