//! Checks the lecture's worked example of attention, as computed by `examples/lecture.rs`, against
//! the lecture's numbers to two decimals and against the f64 reference.

mod common;

#[path = "../examples/lecture.rs"]
mod lecture;

use lecture::{SelfAttention, Weights};

/// Half a unit in the second decimal: a value within this of the expected one prints the same
/// with `{:.2}`, up to the rounding of an exact tie.
const TWO_DECIMALS: f64 = 0.005;

/// Tolerance of the GPU's weights against the f64 reference. The weights lie in [0, 1], where one
/// f32 rounding step is at most 6e-8, and llvmpipe differs from the reference by 4e-8.
const WEIGHT_TOLERANCE: f64 = 1e-5;

fn run_distinct(sentence: &str) -> SelfAttention {
    let words = lecture::distinct_words(sentence);
    match lecture::self_attention(common::context(), &words) {
        Ok(attention) => attention,
        Err(error) => panic!("self-attention of {sentence:?} failed: {error}"),
    }
}

fn run_positions(sentence: &str) -> SelfAttention {
    let tokens: Vec<&str> = sentence.split_whitespace().collect();
    match lecture::self_attention(common::context(), &tokens) {
        Ok(attention) => attention,
        Err(error) => panic!("self-attention of {sentence:?} failed: {error}"),
    }
}

/// Returns the mixture of the first occurrence of `word`.
fn mixture_of(attention: &SelfAttention, word: &str) -> Vec<(String, f64)> {
    let Some(query) = attention.words.iter().position(|name| name == word) else {
        panic!("{word:?} is not among the words {:?}", attention.words);
    };
    lecture::mixture(attention, query)
}

/// Returns the weight of `word` in `terms`, or 0 when it is left out.
fn weight_of(terms: &[(String, f64)], word: &str) -> f64 {
    terms
        .iter()
        .find(|(name, _)| name == word)
        .map_or(0.0, |(_, weight)| *weight)
}

fn assert_two_decimals(query: &str, key: &str, actual: f64, expected: f64) {
    assert!(
        (actual - expected).abs() < TWO_DECIMALS,
        "weight of {key:?} in {query:?} is {actual:.6}, expected {expected:.2}"
    );
}

fn assert_matches_reference(label: &str, weights: &Weights) {
    for (i, (gpu_row, reference_row)) in weights.gpu.iter().zip(&weights.reference).enumerate() {
        for (j, (gpu, reference)) in gpu_row.iter().zip(reference_row).enumerate() {
            assert!(
                (gpu - reference).abs() < WEIGHT_TOLERANCE,
                "{label}: weight [{i}][{j}] is {gpu:.9} on the GPU and {reference:.9} in the f64 \
                 reference"
            );
        }
    }
}

fn assert_masked_weights_zero(label: &str, attention: &SelfAttention) {
    for (i, row) in attention.weights.gpu.iter().enumerate() {
        for (j, &weight) in row.iter().enumerate() {
            if attention.masked[i][j] {
                assert_eq!(
                    weight, 0.0,
                    "{label}: {:?} attends to the masked word {:?} with weight {weight}",
                    attention.words[i], attention.words[j]
                );
            }
        }
    }
}

#[test]
fn orange_mixes_orange_and_apple() {
    let attention = run_distinct("an apple and an orange");
    let terms = mixture_of(&attention, "orange");

    assert_two_decimals("orange", "orange", weight_of(&terms, "orange"), 0.57);
    assert_two_decimals("orange", "apple", weight_of(&terms, "apple"), 0.43);
    assert_eq!(terms.len(), 2, "orange should mix two words, got {terms:?}");
    assert_eq!(
        lecture::format_mixture("orange", &terms),
        "orange = 0.57 orange + 0.43 apple"
    );
}

#[test]
fn and_mixes_and_and_an_equally() {
    let attention = run_distinct("an apple and an orange");
    let terms = mixture_of(&attention, "and");

    assert_two_decimals("and", "and", weight_of(&terms, "and"), 0.50);
    assert_two_decimals("and", "an", weight_of(&terms, "an"), 0.50);
    assert_eq!(terms.len(), 2, "and should mix two words, got {terms:?}");
    assert_eq!(
        lecture::format_mixture("and", &terms),
        "and = 0.50 and + 0.50 an"
    );
}

#[test]
fn phone_mixes_phone_and_apple() {
    let attention = run_distinct("an apple phone");
    let terms = mixture_of(&attention, "phone");

    assert_two_decimals("phone", "phone", weight_of(&terms, "phone"), 0.57);
    assert_two_decimals("phone", "apple", weight_of(&terms, "apple"), 0.43);
    assert_eq!(terms.len(), 2, "phone should mix two words, got {terms:?}");
    assert_eq!(
        lecture::format_mixture("phone", &terms),
        "phone = 0.57 phone + 0.43 apple"
    );
}

#[test]
fn an_attends_only_to_itself() {
    let attention = run_distinct("an apple phone");
    let terms = mixture_of(&attention, "an");

    assert_two_decimals("an", "an", weight_of(&terms, "an"), 1.00);
    assert_eq!(terms.len(), 1, "an should mix one word, got {terms:?}");
    assert_eq!(lecture::format_mixture("an", &terms), "an = 1.00 an");
}

/// With one key per position the repeated "an" has two keys, so "and" no longer splits its
/// weight evenly with "an" as in the lecture.
#[test]
fn repeated_word_gets_one_key_per_position() {
    let attention = run_positions("an apple and an orange");
    let and_row = &attention.weights.gpu[2];

    assert_two_decimals("and", "an (position 0)", and_row[0], 0.33);
    assert_two_decimals("and", "and (position 2)", and_row[2], 0.33);
    assert_two_decimals("and", "an (position 3)", and_row[3], 0.33);

    let terms = mixture_of(&attention, "and");
    assert_two_decimals("and", "an (both positions)", weight_of(&terms, "an"), 0.67);
    assert_two_decimals("and", "and", weight_of(&terms, "and"), 0.33);

    let orange = mixture_of(&attention, "orange");
    assert_two_decimals("orange", "orange", weight_of(&orange, "orange"), 0.57);
    assert_two_decimals("orange", "apple", weight_of(&orange, "apple"), 0.43);
}

#[test]
fn weights_match_reference() {
    for sentence in lecture::SENTENCES {
        let distinct = run_distinct(sentence);
        let label = format!("{sentence:?}, one key per distinct word");
        assert_matches_reference(&label, &distinct.weights);
        assert_masked_weights_zero(&label, &distinct);

        let positions = run_positions(sentence);
        let label = format!("{sentence:?}, one key per position");
        assert_matches_reference(&label, &positions.weights);
        assert_masked_weights_zero(&label, &positions);
    }
}

#[test]
fn scaled_dot_products_match_lecture() {
    let keys: Vec<Vec<f32>> = lecture::SCALED_KEYS
        .iter()
        .map(|key| key.to_vec())
        .collect();
    let scores = match lecture::scaled_scores(common::context(), &lecture::SCALED_QUERY, &keys) {
        Ok(scores) => scores,
        Err(error) => panic!("scaled dot products failed: {error}"),
    };
    assert_matches_reference("scaled dot products", &scores.weights);

    assert!(
        (scores.gpu[0] - 8.49).abs() < TWO_DECIMALS,
        "(1,4)·(0,3)/√2 is {:.6} on the GPU, expected 8.49",
        scores.gpu[0]
    );
    assert!(
        (scores.gpu[1] - 2.12).abs() < TWO_DECIMALS,
        "(1,4)·(3,0)/√2 is {:.6} on the GPU, expected 2.12",
        scores.gpu[1]
    );

    // A recovered score carries the error of lse plus the relative error of its weight. The
    // second weight is about e^-6.4, and on llvmpipe its score is off by about 1e-6. The bound
    // leaves room for less exact exp implementations.
    for j in 0..keys.len() {
        assert!(
            (scores.gpu[j] - scores.exact[j]).abs() < 1e-4,
            "score of key {j} is {:.9} on the GPU and {:.9} in f64",
            scores.gpu[j],
            scores.exact[j]
        );
        assert!(
            (scores.reference[j] - scores.exact[j]).abs() < 1e-9,
            "score of key {j} recovered from the reference is {:.12}, direct f64 gives {:.12}",
            scores.reference[j],
            scores.exact[j]
        );
    }
}
