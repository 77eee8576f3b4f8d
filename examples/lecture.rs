//! A lecture's worked example of attention, computed by the crate's GPU kernels.
//!
//! Words are embedded as 3-vectors of (tech, fruitiness, other). Each word of a sentence becomes
//! a mixture of the sentence's words, weighted by the softmax of their cosine similarities, where
//! the softmax runs only over the similarities that are not zero. The kernels compute
//! `softmax(scale · Q Kᵀ + mask) · V`, so this example sets:
//!
//! - Q = K = the unit-length embeddings, so that `Q Kᵀ` is the cosine similarity, with scale 1;
//! - the additive mask to `-inf` where the similarity is 0, which leaves those words out;
//! - V = the identity, so that output row `i` is the row of attention weights of word `i`.
//!
//! The lecture's numbers come out when each distinct word of a sentence is one key. The example
//! also runs one key per position, where the repeated "an" of the first sentence takes more
//! weight.
//!
//! The second part computes the scaled dot products `q · k / √d_k` of the same lecture, and
//! recovers them from the kernels' log-sum-exp output.
//!
//! Run it with `cargo run --release --example lecture`. `tests/lecture.rs` includes this file as
//! a module and checks the numbers it prints.

// The test includes this file as a module and never calls `main`.
#![allow(dead_code)]

use wgpu_attention::{
    AttentionInputs, AttentionProblem, AttentionShape, Context, Kernel, Result, reference,
};

/// Length of the lecture's word embeddings.
pub const EMBEDDING_DIM: usize = 3;

/// The lecture's embeddings as (tech, fruitiness, other).
pub const VOCABULARY: [(&str, [f64; EMBEDDING_DIM]); 5] = [
    ("orange", [0.0, 3.0, 0.0]),
    ("phone", [4.0, 0.0, 0.0]),
    ("apple", [2.0, 2.0, 0.0]),
    ("and", [0.0, 0.0, 2.0]),
    ("an", [0.0, 0.0, 3.0]),
];

/// The lecture's two sentences.
pub const SENTENCES: [&str; 2] = ["an apple and an orange", "an apple phone"];

/// The lecture's scaled dot product example: a query and two keys with `d_k = 2`.
pub const SCALED_QUERY: [f32; 2] = [1.0, 4.0];
/// Keys of the scaled dot product example.
pub const SCALED_KEYS: [[f32; 2]; 2] = [[0.0, 3.0], [3.0, 0.0]];

/// Returns the embedding of `word`.
///
/// # Panics
///
/// If `word` is not in [`VOCABULARY`].
pub fn embedding(word: &str) -> [f64; EMBEDDING_DIM] {
    match VOCABULARY.iter().find(|(name, _)| *name == word) {
        Some((_, vector)) => *vector,
        None => panic!("no embedding for the word {word:?}: add it to VOCABULARY"),
    }
}

/// Returns the words of `sentence` in order of first appearance, each once.
pub fn distinct_words(sentence: &str) -> Vec<&str> {
    let mut words: Vec<&str> = Vec::new();
    for word in sentence.split_whitespace() {
        if !words.contains(&word) {
            words.push(word);
        }
    }
    words
}

/// Attention weights of one head, computed with V = identity, from the GPU kernels and from the
/// f64 CPU reference.
#[derive(Clone, Debug)]
pub struct Weights {
    /// `gpu[i][j]`: the weight of key `j` in the output of query `i`.
    pub gpu: Vec<Vec<f64>>,
    /// The kernels' log-sum-exp of each query's scaled, masked scores.
    pub gpu_lse: Vec<f64>,
    /// The reference's weights, indexed as `gpu`.
    pub reference: Vec<Vec<f64>>,
    /// The reference's log-sum-exp.
    pub reference_lse: Vec<f64>,
}

/// Runs one attention head through [`Kernel::ThreeStage`] with V = identity and returns the
/// weights, together with the reference's.
///
/// The crate needs one head dimension for Q, K and V, while the identity V needs one column per
/// key. So the head dimension is the larger of the two, and Q and K are padded with zeros, which
/// leaves their dot products unchanged. `mask` has one row of `keys.len()` entries per query.
///
/// # Errors
///
/// Any error of [`Context::attention_with`] or [`reference::attention`], such as empty `queries`
/// or `keys`.
pub fn attention_weights(
    context: &Context,
    queries: &[Vec<f32>],
    keys: &[Vec<f32>],
    scale: f64,
    mask: Option<&[f32]>,
) -> Result<Weights> {
    let seq_q = queries.len();
    let seq_kv = keys.len();
    let vector_dim = queries.first().map_or(0, Vec::len);
    let head_dim = vector_dim.max(seq_kv);

    let pad = |rows: &[Vec<f32>]| -> Vec<f32> {
        let mut padded = vec![0.0f32; rows.len() * head_dim];
        for (row, padded_row) in rows.iter().zip(padded.chunks_mut(head_dim)) {
            padded_row[..row.len()].copy_from_slice(row);
        }
        padded
    };
    let q = pad(queries);
    let k = pad(keys);
    let mut v = vec![0.0f32; seq_kv * head_dim];
    for j in 0..seq_kv {
        v[j * head_dim + j] = 1.0;
    }

    let shape = AttentionShape::new(1, 1, seq_q, seq_kv, head_dim);
    let mut problem = AttentionProblem::new(shape).with_scale(scale);
    if mask.is_some() {
        problem = problem.with_mask(1, 1);
    }
    let inputs = AttentionInputs {
        mask,
        ..AttentionInputs::new(&q, &k, &v)
    };
    let gpu = context.attention_with(Kernel::ThreeStage, &problem, &inputs)?;
    let expected = reference::attention(&problem, &inputs)?;

    // Columns past `seq_kv` belong to no key, because they are the zero padding of V.
    let gpu_rows = gpu
        .out
        .chunks(head_dim)
        .map(|row| row[..seq_kv].iter().map(|&x| x as f64).collect());
    let reference_rows = expected
        .out
        .chunks(head_dim)
        .map(|row| row[..seq_kv].to_vec());
    Ok(Weights {
        gpu: gpu_rows.collect(),
        gpu_lse: gpu.lse.iter().map(|&x| x as f64).collect(),
        reference: reference_rows.collect(),
        reference_lse: expected.lse,
    })
}

/// Self-attention of a list of words, each word being one query and one key.
#[derive(Clone, Debug)]
pub struct SelfAttention {
    /// The words in order. A word may repeat.
    pub words: Vec<String>,
    /// `similarity[i][j]`: cosine similarity of words `i` and `j`.
    pub similarity: Vec<Vec<f64>>,
    /// `masked[i][j]`: whether the similarity is 0, so word `i` does not attend to word `j`.
    pub masked: Vec<Vec<bool>>,
    /// Attention weights, indexed as `similarity`.
    pub weights: Weights,
}

/// Computes the self-attention of `words` on the GPU: softmax of the cosine similarities, over
/// the similarities that are not zero.
///
/// # Errors
///
/// Any error of [`attention_weights`], such as an empty `words`.
///
/// # Panics
///
/// If a word is not in [`VOCABULARY`].
pub fn self_attention(context: &Context, words: &[&str]) -> Result<SelfAttention> {
    let embeddings: Vec<[f64; EMBEDDING_DIM]> = words.iter().map(|word| embedding(word)).collect();
    let units: Vec<[f64; EMBEDDING_DIM]> = embeddings.iter().map(unit_vector).collect();

    let similarity: Vec<Vec<f64>> = units
        .iter()
        .map(|a| units.iter().map(|b| dot(a, b)).collect())
        .collect();

    // The test for zero uses the integer embeddings, whose dot products are exact, rather than
    // the rounded unit vectors.
    let masked: Vec<Vec<bool>> = embeddings
        .iter()
        .map(|a| embeddings.iter().map(|b| dot(a, b) == 0.0).collect())
        .collect();
    let mask: Vec<f32> = masked
        .iter()
        .flatten()
        .map(|&is_masked| if is_masked { f32::NEG_INFINITY } else { 0.0 })
        .collect();

    let unit_rows: Vec<Vec<f32>> = units
        .iter()
        .map(|unit| unit.iter().map(|&x| x as f32).collect())
        .collect();
    let weights = attention_weights(context, &unit_rows, &unit_rows, 1.0, Some(&mask))?;
    Ok(SelfAttention {
        words: words.iter().map(|word| word.to_string()).collect(),
        similarity,
        masked,
        weights,
    })
}

/// Returns the output of word `query` as (word, weight) terms, with the weights of a repeated
/// word summed and masked words left out.
///
/// The terms are sorted by weight as printed to two decimals, largest first. Among equal weights
/// the word itself comes first, then the others in sentence order.
pub fn mixture(attention: &SelfAttention, query: usize) -> Vec<(String, f64)> {
    let mut terms: Vec<(String, f64)> = Vec::new();
    let weights = &attention.weights.gpu[query];
    for (j, word) in attention.words.iter().enumerate() {
        if attention.masked[query][j] {
            continue;
        }
        match terms.iter_mut().find(|(name, _)| name == word) {
            Some(term) => term.1 += weights[j],
            None => terms.push((word.clone(), weights[j])),
        }
    }

    let own_word = &attention.words[query];
    let hundredths = |weight: f64| (weight * 100.0).round() as i64;
    terms.sort_by_key(|(word, weight)| (-hundredths(*weight), word != own_word));
    terms
}

/// Formats a mixture as `orange = 0.57 orange + 0.43 apple`.
pub fn format_mixture(word: &str, terms: &[(String, f64)]) -> String {
    let sum: Vec<String> = terms
        .iter()
        .map(|(name, weight)| format!("{weight:.2} {name}"))
        .collect();
    format!("{word} = {}", sum.join(" + "))
}

/// Scaled dot products of the lecture's second example, from the GPU and from the reference.
#[derive(Clone, Debug)]
pub struct ScaledScores {
    /// `q · k[j] / √d_k` recovered from the kernels' output.
    pub gpu: Vec<f64>,
    /// The same, recovered from the reference's output.
    pub reference: Vec<f64>,
    /// The same, computed directly in f64.
    pub exact: Vec<f64>,
    /// The weights the scores were recovered from.
    pub weights: Weights,
}

/// Computes the scaled dot products `q · k[j] / √d_k` through the kernels, with `d_k` the length
/// of `query`.
///
/// The kernels return weights `w[j] = exp(s[j] - lse)` rather than the scores `s[j]`, so each
/// score is recovered as `lse + ln w[j]`.
///
/// # Errors
///
/// Any error of [`attention_weights`].
pub fn scaled_scores(context: &Context, query: &[f32], keys: &[Vec<f32>]) -> Result<ScaledScores> {
    // The scale comes from the real d_k, not from the zero-padded head dimension.
    let scale = 1.0 / (query.len() as f64).sqrt();
    let weights = attention_weights(context, &[query.to_vec()], keys, scale, None)?;

    let recover =
        |lse: f64, row: &[f64]| -> Vec<f64> { row.iter().map(|&w| lse + w.ln()).collect() };
    let exact = keys
        .iter()
        .map(|key| {
            let dot: f64 = query
                .iter()
                .zip(key)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            dot * scale
        })
        .collect();
    Ok(ScaledScores {
        gpu: recover(weights.gpu_lse[0], &weights.gpu[0]),
        reference: recover(weights.reference_lse[0], &weights.reference[0]),
        exact,
        weights,
    })
}

/// Returns the largest absolute difference between the GPU's and the reference's weights.
pub fn max_weight_error(weights: &Weights) -> f64 {
    let pairs = weights
        .gpu
        .iter()
        .flatten()
        .zip(weights.reference.iter().flatten());
    pairs.map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
}

fn dot(a: &[f64; EMBEDDING_DIM], b: &[f64; EMBEDDING_DIM]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn unit_vector(vector: &[f64; EMBEDDING_DIM]) -> [f64; EMBEDDING_DIM] {
    let norm = dot(vector, vector).sqrt();
    vector.map(|x| x / norm)
}

fn print_table(
    title: &str,
    words: &[String],
    rows: &[Vec<f64>],
    masked: impl Fn(usize, usize) -> bool,
) {
    println!("{title}");
    print!("{:>8}", "");
    for word in words {
        print!("{word:>8}");
    }
    println!();
    for (i, row) in rows.iter().enumerate() {
        print!("{:>8}", words[i]);
        for (j, value) in row.iter().enumerate() {
            if masked(i, j) {
                print!("{:>8}", "-");
            } else {
                print!("{value:>8.2}");
            }
        }
        println!();
    }
    println!();
}

fn print_self_attention(heading: &str, attention: &SelfAttention) {
    println!("{heading}");
    println!();
    let words = &attention.words;
    let masked = |i: usize, j: usize| attention.masked[i][j];
    print_table(
        "cosine similarity:",
        words,
        &attention.similarity,
        |_, _| false,
    );
    print_table(
        "attention weights (row = word, column = the word it attends to; - = masked):",
        words,
        &attention.weights.gpu,
        masked,
    );
    for (i, word) in words.iter().enumerate() {
        println!("  {}", format_mixture(word, &mixture(attention, i)));
    }
    println!();
    println!(
        "  largest |GPU - f64 reference| weight difference: {:.1e}",
        max_weight_error(&attention.weights)
    );
    println!();
}

fn run() -> Result<()> {
    let context = Context::new()?;
    let info = context.adapter_info();
    println!(
        "adapter: {} ({})",
        info.name,
        wgpu_attention::backend_name(info.backend)
    );
    println!();

    println!("Embeddings (tech, fruitiness, other):");
    for (word, vector) in VOCABULARY {
        println!("  {word:>8} = {vector:?}");
    }
    println!();

    for sentence in SENTENCES {
        let words = distinct_words(sentence);
        let attention = self_attention(&context, &words)?;
        print_self_attention(
            &format!("\"{sentence}\", one key per distinct word:"),
            &attention,
        );
    }

    // The lecture counts a repeated word once. Self-attention over the token sequence gives the
    // repeated word one key per position, and so more weight.
    let sentence = SENTENCES[0];
    let tokens: Vec<&str> = sentence.split_whitespace().collect();
    let attention = self_attention(&context, &tokens)?;
    print_self_attention(
        &format!(
            "\"{sentence}\", one key per position (weights of a repeated word summed in the mixtures):"
        ),
        &attention,
    );

    let keys: Vec<Vec<f32>> = SCALED_KEYS.iter().map(|key| key.to_vec()).collect();
    let scores = scaled_scores(&context, &SCALED_QUERY, &keys)?;
    println!("Scaled dot products, d_k = {}:", SCALED_QUERY.len());
    for (j, key) in SCALED_KEYS.iter().enumerate() {
        println!(
            "  {SCALED_QUERY:?} · {key:?} / √{} = {:.2}   (f64: {:.6}, GPU: {:.6})",
            SCALED_QUERY.len(),
            scores.gpu[j],
            scores.exact[j],
            scores.gpu[j],
        );
    }
    Ok(())
}

fn main() {
    if let Err(error) = run() {
        eprintln!("lecture: {error}");
        std::process::exit(1);
    }
}
