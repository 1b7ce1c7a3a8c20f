use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::HashSet;
use switch_data::span::SpanCorruption;
use switch_data::{fnv1a, split_of, DataConfig, Dataset, Objective, Split, TokenizerKind, Vocab};

const SENTINELS: [u32; 60] = {
    let mut s = [0u32; 60];
    let mut i = 0;
    while i < 60 {
        s[i] = 1_000_000 + i as u32;
        i += 1;
    }
    s
};

/// Undoes span corruption: walk the inputs, replacing each sentinel by the tokens that follow it in the targets.
fn reconstruct(inputs: &[u32], targets: &[u32]) -> Vec<u32> {
    let mut out = Vec::new();
    for &t in &inputs[..inputs.len() - 1] {
        if let Some(pos) = targets.iter().position(|&x| x == t && t >= 1_000_000) {
            out.extend(targets[pos + 1..].iter().take_while(|&&x| x < 1_000_000 && x != 1));
        } else {
            out.push(t);
        }
    }
    out
}

#[test]
fn span_corruption_is_t5s() {
    for encoder_len in [64, 128, 512] {
        let sc = SpanCorruption::for_encoder_len(encoder_len, 0.15, 3.0).unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        let (mut noise, mut total, mut spans, mut span_tokens) = (0usize, 0usize, 0usize, 0usize);
        for e in 0..300u32 {
            let raw: Vec<u32> = (0..sc.raw_len as u32).map(|i| 10 + (i + e * 7) % 50_000).collect();
            let (inputs, targets) = sc.corrupt(&raw, &SENTINELS, 1, &mut rng);
            assert_eq!(inputs.len(), encoder_len, "inputs are exactly the encoder length");
            assert_eq!(targets.len(), sc.decoder_len);
            assert_eq!(reconstruct(&inputs, &targets), raw, "inputs + targets give back the text");
            let mask = sc.noise_mask(&mut rng);
            noise += mask.iter().filter(|&&m| m).count();
            total += mask.len();
            spans += mask.windows(2).filter(|w| !w[0] && w[1]).count() + mask[0] as usize;
            span_tokens += mask.iter().filter(|&&m| m).count();
        }
        let density = noise as f64 / total as f64;
        assert!((density - 0.15).abs() <= 0.02, "noise density {density}");
        let mean_span = span_tokens as f64 / spans as f64;
        assert!((mean_span - 3.0).abs() < 0.35, "mean span length {mean_span}");
    }
    assert!(SpanCorruption::for_encoder_len(3, 0.15, 3.0).is_err());
}

fn corpus_dir(dir: &std::path::Path) -> std::path::PathBuf {
    // Two sources of numbered, unique lines, so any overlap between splits is visible.
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    for (k, source) in ["alpha", "beta"].into_iter().enumerate() {
        let text: String = (k * 10000..k * 10000 + 6000)
            .map(|i| format!("{source} line {i:05} the quick brown fox jumps over the lazy dog\n"))
            .collect();
        std::fs::write(corpus.join(format!("{source}.txt")), text).unwrap();
    }
    corpus
}

fn cfg(corpus: &std::path::Path, tokenizer: TokenizerKind) -> DataConfig {
    DataConfig {
        corpus: corpus.display().to_string(),
        tokenizer,
        vocab_size: 600,
        encoder_len: 64,
        eval_examples: 32,
        held_out_fraction: 0.05,
        ..Default::default()
    }
}

fn lines(text: &str) -> HashSet<String> {
    text.lines().filter(|l| l.len() > 20 && l.ends_with("dog")).map(|l| l.to_string()).collect()
}

#[test]
fn split_of_gives_two_disjoint_evenly_spaced_held_out_sets() {
    for fraction in [0.02, 0.05, 0.1, 0.25] {
        let splits: Vec<Split> = (0..4000).map(|i| split_of(i, fraction)).collect();
        let count = |s| splits.iter().filter(|&&x| x == s).count() as f64;
        for s in [Split::Validation, Split::Test] {
            assert!((count(s) / 4000.0 - fraction).abs() < 0.002, "{s:?} at {fraction}: {}", count(s));
        }
    }
    // At 2%: validation chunks 24, 74, …; test chunks 37, 87, …
    let at = |s| (0..100).filter(|&i| split_of(i, 0.02) == s).collect::<Vec<_>>();
    assert_eq!((at(Split::Validation), at(Split::Test)), (vec![24, 74], vec![37, 87]));
}

#[test]
fn the_three_splits_are_disjoint_and_cover_every_source() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus_dir(tmp.path());
    let ds = Dataset::build(&cfg(&corpus, TokenizerKind::Byte), &tmp.path().join("cache")).unwrap();
    let train = lines(&ds.vocab.decode(&ds.train_tokens));
    let held = lines(&ds.vocab.decode(&ds.validation_tokens));
    let test = lines(&ds.vocab.decode(&ds.test_tokens));
    assert!(!held.is_empty() && !test.is_empty() && train.len() > 10 * held.len());
    assert!(train.is_disjoint(&held), "a validation line is also in the training split");
    assert!(train.is_disjoint(&test), "a test line is also in the training split");
    assert!(held.is_disjoint(&test), "a test line is also in the validation split");
    for source in ["alpha", "beta"] {
        assert!(held.iter().any(|l| l.starts_with(source)), "no validation text from {source}");
        assert!(test.iter().any(|l| l.starts_with(source)), "no test text from {source}");
    }
    assert!(ds.split_summary.iter().all(|(_, chunks, v, t)| *v > 0 && *t > 0 && v + t < *chunks));
    // Training batches never read a test line: every line a batch names is a training line.
    for step in 0..50 {
        let batch = ds.train_batch(0, step, 8);
        let text = ds.vocab.decode(&batch.encoder_ids.iter().map(|&t| t as u32).collect::<Vec<_>>());
        let named: Vec<&str> = text.lines().filter(|l| l.len() > 40 && l.ends_with("dog")).collect();
        assert!(named.iter().all(|l| !test.contains(*l) && !held.contains(*l)), "step {step} read held-out text");
    }
    // The test examples come from the test text, and differ from validation's.
    let test_eval = ds.eval_batches(Split::Test, 8);
    assert_ne!(test_eval, ds.eval_batches(Split::Validation, 8));
    // Evaluation examples come from the held-out text only, and are the same every time.
    let eval = ds.eval_batches(Split::Validation, 8);
    assert_eq!(eval.len(), 4);
    assert_eq!(eval, ds.eval_batches(Split::Validation, 8));
    // Every uncorrupted run of an evaluation input that names a line names a held-out line.
    let mut named = 0;
    for batch in &eval {
        for run in batch.encoder_ids.split(|&t| t < 2 + ds.vocab.num_sentinels) {
            let text = ds.vocab.decode(&run.iter().map(|&t| t as u32).collect::<Vec<_>>());
            for (i, _) in text.match_indices("line ") {
                let Some(number) = text.get(i..i + 10).filter(|n| n[5..].bytes().all(|b| b.is_ascii_digit())) else {
                    continue;
                };
                assert!(
                    held.iter().any(|l| l.contains(number)) && !train.iter().any(|l| l.contains(number)),
                    "{number}"
                );
                named += 1;
            }
        }
    }
    assert!(named > 20);
}

#[test]
fn batches_depend_on_seed_and_step_only() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus_dir(tmp.path());
    let ds = Dataset::build(&cfg(&corpus, TokenizerKind::Byte), &tmp.path().join("cache")).unwrap();
    let a = ds.train_batch(1, 5, 4);
    assert_eq!(a, ds.train_batch(1, 5, 4));
    assert_ne!(a, ds.train_batch(2, 5, 4));
    assert_ne!(a, ds.train_batch(1, 6, 4));
    assert_eq!(a.encoder_ids.len(), 4 * 64);
    assert_eq!(a.targets.len(), 4 * ds.lengths.decoder);
    assert_eq!(a.decoder_input_ids[0], Vocab::PAD as usize);
    assert_eq!(a.decoder_input_ids[1..ds.lengths.decoder], a.targets[..ds.lengths.decoder - 1]);
}

#[test]
fn bpe_tokenizer_round_trips_and_is_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus_dir(tmp.path());
    let c = cfg(&corpus, TokenizerKind::Bpe);
    let ds = Dataset::build(&c, &tmp.path().join("cache")).unwrap();
    let text = "alpha line 00042 the quick brown fox jumps over the lazy dog\nNew words: Zürich, naïve!";
    assert_eq!(ds.vocab.decode(&ds.vocab.encode(text)), text);
    assert!(ds.vocab.encode("the quick brown fox").len() < "the quick brown fox".len() / 2, "BPE merges common words");
    let sentinel = ds.vocab.sentinels()[0];
    assert_eq!(ds.vocab.decode(&[sentinel]), "<extra_id_0>");
    let again = Dataset::build(&c, &tmp.path().join("cache")).unwrap();
    assert_eq!(again.train_tokens, ds.train_tokens);
    let cached: Vec<_> = std::fs::read_dir(tmp.path().join("cache")).unwrap().collect();
    assert_eq!(cached.len(), 1, "one cache entry for one corpus and vocabulary");
}

#[test]
fn bad_corpora_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let check = |path: &std::path::Path, needle: &str| {
        let err = Dataset::build(&cfg(path, TokenizerKind::Byte), &cache).err().expect("must fail").to_string();
        assert!(err.contains(&path.display().to_string()) && err.contains(needle), "{err}");
    };
    check(&tmp.path().join("missing.txt"), "does not exist");
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    check(&empty, "is empty");
    let latin1 = tmp.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9 au lait").unwrap();
    check(&latin1, "not UTF-8");
    let small = tmp.path().join("small.txt");
    std::fs::write(&small, "a short text\n".repeat(50)).unwrap();
    check(&small, "validation split");
    assert!(!cache.exists(), "a refused corpus writes nothing to the cache");
    // Held-out splits big enough, but too little training text for 8 windows of 568 tokens: the
    // byte tokenizer's 4 KiB training chunk (refused before tokenizing), and BPE's 5 KiB training
    // text that encodes to fewer tokens than bytes (refused after tokenizing, still before writing).
    let few = |path: &std::path::Path, tokenizer, bytes: usize, unit: &str| {
        let line = "one line of a corpus with far too little training text\n";
        std::fs::write(path, line.repeat(bytes / line.len())).unwrap();
        let c = DataConfig { encoder_len: 512, eval_examples: 1, held_out_fraction: 0.25, ..cfg(path, tokenizer) };
        let err = Dataset::build(&c, &cache).err().expect("must fail").to_string();
        assert!(!cache.exists(), "a corpus refused for its training split writes nothing to the cache: {err}");
        assert!(err.contains(&path.display().to_string()) && err.contains("training") && err.contains(unit), "{err}");
    };
    few(&tmp.path().join("few-bytes.txt"), TokenizerKind::Byte, 12_000, "bytes");
    few(&tmp.path().join("few-tokens.txt"), TokenizerKind::Bpe, 13_500, "tokens");
    let jsonl = tmp.path().join("bad.jsonl");
    std::fs::write(&jsonl, "{\"body\": \"x\"}\n").unwrap();
    let err = Dataset::build(&cfg(&jsonl, TokenizerKind::Byte), &cache).err().unwrap().to_string();
    assert!(err.contains("bad.jsonl:1") && err.contains("`text`"), "{err}");
}

#[test]
fn jsonl_corpora_are_read() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("docs.jsonl");
    let body: String = (0..3000)
        .map(|i| format!("{{\"text\": \"document {i:05} says hello to the world of sparse experts\"}}\n"))
        .collect();
    std::fs::write(&path, body).unwrap();
    let ds = Dataset::build(&cfg(&path, TokenizerKind::Byte), &tmp.path().join("cache")).unwrap();
    assert!(ds.vocab.decode(&ds.train_tokens[..200]).contains("document 00000 says hello"));
}

#[test]
fn prefix_lm_predicts_the_continuation_of_its_window() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus_dir(tmp.path());
    let c = DataConfig { objective: Objective::PrefixLm, ..cfg(&corpus, TokenizerKind::Byte) };
    let ds = Dataset::build(&c, &tmp.path().join("cache")).unwrap();
    assert_eq!((ds.lengths.raw, ds.lengths.encoder, ds.lengths.decoder), (128, 64, 64));
    let stream = |ids: &[u32]| ids.iter().map(|&t| t as usize).collect::<Vec<_>>();
    let (train, held, test) = (stream(&ds.train_tokens), stream(&ds.validation_tokens), stream(&ds.test_tokens));
    for (batch, text) in [
        (ds.train_batch(3, 7, 4), &train),
        (ds.eval_batches(Split::Validation, 8)[1].clone(), &held),
        (ds.eval_batches(Split::Test, 8)[1].clone(), &test),
    ] {
        for e in 0..batch.batch_size {
            let (inputs, targets) = (&batch.encoder_ids[e * 64..][..64], &batch.targets[e * 64..][..64]);
            // The prefix and its continuation are one contiguous window of the split's text.
            let window: Vec<usize> = inputs.iter().chain(targets).copied().collect();
            assert!(text.windows(128).any(|w| w == window.as_slice()), "example {e} is not a window of its split");
            let decoder_inputs = &batch.decoder_input_ids[e * 64..][..64];
            assert_eq!(decoder_inputs[0], Vocab::PAD as usize);
            assert_eq!(decoder_inputs[1..], targets[..63]);
        }
    }
    let t5 = DataConfig { encoder_len: 512, ..Default::default() }.lengths().unwrap();
    assert_eq!((t5.raw, t5.encoder, t5.decoder), (568, 512, 114), "span corruption keeps T5's lengths");
    assert_eq!(DataConfig::default().lengths().unwrap().decoder, 29);
    assert_eq!(DataConfig { encoder_len: 64, ..Default::default() }.lengths().unwrap().decoder, 16);
    assert!(serde_json::to_string(&c).unwrap().contains(r#""objective":"prefix_lm""#));
}

#[test]
fn causal_lm_predicts_every_token_of_its_window() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus_dir(tmp.path());
    let c = DataConfig { objective: Objective::CausalLm, ..cfg(&corpus, TokenizerKind::Byte) };
    let ds = Dataset::build(&c, &tmp.path().join("cache")).unwrap();
    assert_eq!((ds.lengths.raw, ds.lengths.encoder, ds.lengths.decoder), (128, 0, 128));
    let train: Vec<usize> = ds.train_tokens.iter().map(|&t| t as usize).collect();
    let batch = ds.train_batch(3, 7, 4);
    assert!(batch.encoder_ids.is_empty(), "no encoder input");
    for e in 0..batch.batch_size {
        let targets = &batch.targets[e * 128..][..128];
        assert!(train.windows(128).any(|w| w == targets), "example {e} is not a window of the training split");
        let decoder_inputs = &batch.decoder_input_ids[e * 128..][..128];
        assert_eq!(decoder_inputs[0], Vocab::PAD as usize);
        assert_eq!(decoder_inputs[1..], targets[..127]);
    }
    assert_eq!(ds.eval_batches(Split::Validation, 8)[0].targets.len(), 8 * 128);
    assert!(serde_json::to_string(&c).unwrap().contains(r#""objective":"causal_lm""#));
}

/// The one entry (corpus and vocabulary) of a cache folder.
fn cache_entry(cache: &std::path::Path) -> std::path::PathBuf {
    let entries: Vec<_> = std::fs::read_dir(cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries[0].clone()
}

/// The (bytes, FNV-1a) that `checksums.json` in `entry` records for `name`.
fn recorded(entry: &std::path::Path, name: &str) -> (u64, String) {
    let sums: serde_json::Value =
        serde_json::from_slice(&std::fs::read(entry.join("checksums.json")).expect("checksums are written")).unwrap();
    let file = sums["files"].as_array().unwrap().iter().find(|f| f["name"] == name).expect("a checksum per file");
    (file["bytes"].as_u64().unwrap(), file["fnv1a"].as_str().unwrap().to_string())
}

/// Writes the checksum of `entry/name` as it now is, as a stale or hand-edited cache would have it.
fn rewrite_checksum(entry: &std::path::Path, name: &str) {
    let path = entry.join("checksums.json");
    let mut sums: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let bytes = std::fs::read(entry.join(name)).unwrap();
    for f in sums["files"].as_array_mut().unwrap().iter_mut().filter(|f| f["name"] == name) {
        f["bytes"] = bytes.len().into();
        f["fnv1a"] = format!("{:016x}", fnv1a(&bytes)).into();
    }
    std::fs::write(&path, serde_json::to_vec(&sums).unwrap()).unwrap();
}

#[test]
fn a_damaged_token_cache_is_rebuilt_not_trusted() {
    for tokenizer in [TokenizerKind::Bpe, TokenizerKind::Byte] {
        let tmp = tempfile::tempdir().unwrap();
        let corpus = corpus_dir(tmp.path());
        let cache = tmp.path().join("cache");
        let c = cfg(&corpus, tokenizer);
        let first = Dataset::build(&c, &cache).unwrap();
        let entry = cache_entry(&cache);
        let train = entry.join("train.u32");
        let healthy = std::fs::read(&train).unwrap();
        let files: &[&str] = match tokenizer {
            TokenizerKind::Bpe => &["tokenizer.json", "train.u32", "validation.u32", "test.u32"],
            TokenizerKind::Byte => &["train.u32", "validation.u32", "test.u32"],
        };
        for name in files {
            let bytes = std::fs::read(entry.join(name)).unwrap();
            assert_eq!(recorded(&entry, name), (bytes.len() as u64, format!("{:016x}", fnv1a(&bytes))), "{name}");
        }
        let mut rng = StdRng::seed_from_u64(7);
        let noise: Vec<u8> = (0..healthy.len()).map(|_| rng.gen()).collect();
        let damage = |what: &str| match what {
            "random bytes of the same length" => std::fs::write(&train, &noise).unwrap(),
            "a truncated file" => std::fs::write(&train, &healthy[..healthy.len() - 4003]).unwrap(),
            "no checksums (an older cache)" => std::fs::remove_file(entry.join("checksums.json")).unwrap(),
            "a missing token file" => std::fs::remove_file(entry.join("test.u32")).unwrap(),
            "out-of-vocabulary ids under a matching checksum" => {
                std::fs::write(&train, &noise).unwrap();
                rewrite_checksum(&entry, "train.u32");
            }
            _ => unreachable!(),
        };
        for what in [
            "random bytes of the same length",
            "a truncated file",
            "no checksums (an older cache)",
            "a missing token file",
            "out-of-vocabulary ids under a matching checksum",
        ] {
            damage(what);
            let again = Dataset::build(&c, &cache).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(again.train_tokens, first.train_tokens, "{what}");
            assert_eq!(again.validation_tokens, first.validation_tokens, "{what}");
            assert_eq!(again.test_tokens, first.test_tokens, "{what}");
            assert!(again.train_tokens.iter().all(|&t| (t as usize) < again.vocab.size), "{what}");
            assert_eq!(std::fs::read(&train).unwrap(), healthy, "{what}: the rebuilt file is the healthy one");
            assert_eq!(recorded(&entry, "train.u32"), (healthy.len() as u64, format!("{:016x}", fnv1a(&healthy))));
            // Batches read the rebuilt stream (a damaged one indexed past the embedding table).
            assert_eq!(again.train_batch(0, 3, 4), first.train_batch(0, 3, 4), "{what}");
        }
        if tokenizer == TokenizerKind::Bpe {
            let json = entry.join("tokenizer.json");
            let good = std::fs::read(&json).unwrap();
            std::fs::write(&json, &good[..good.len() / 2]).unwrap();
            let again = Dataset::build(&c, &cache).expect("a damaged tokenizer is retrained");
            assert_eq!((again.train_tokens, std::fs::read(&json).unwrap()), (first.train_tokens, good));
        }
        assert_eq!(cache_entry(&cache), entry, "rebuilt in place");
    }
}
