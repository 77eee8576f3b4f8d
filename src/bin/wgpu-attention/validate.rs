//! `validate`: runs the kernels on a grid of generated problems and judges each output against
//! the f64 CPU reference.
//!
//! A case is one problem, one dtype and one kernel. The grid has seven parts:
//!
//! - every pair of odd sequence lengths from [`SEQ_LENS`] (with `seq_q > seq_kv` too), crossed
//!   with every head dim, with the grouped-query ratio and the masking options rotated so that
//!   each sequence-length pair meets every causal mode;
//! - every combination of the masking options (causal, additive mask, soft-capping, sliding
//!   window), crossed with every grouped-query ratio, on two fixed shapes;
//! - decoding steps (one query over [`DECODE_SEQ_KV`] keys), crossed with every head dim and
//!   ratio, with the masking options rotated;
//! - every combination of the variants that live in the inputs (ALiBi slopes, attention sinks,
//!   key lengths, packed sequences), crossed with every layout of [`LAYOUTS`] and every head-dim
//!   pair of [`VARIANT_HEAD_DIMS`], with the masking options, lengths and ratios rotated;
//! - long prefill at [`LONG_PREFILL`], where the subgroup program takes its largest blocks;
//! - packed sequences of thousands of keys ([`LONG_PACKED`]), in decoding and prefill, whose key
//!   splits under llvmpipe's loop cap depend on the programs going without bounds checks;
//! - large scores: the explicit scales of [`LARGE_SCALES`], in prefill and decoding, which the
//!   f32 tolerance alone would reject without an allowance for score rounding.
//!
//! Each problem runs in f32 and f16. Inputs are drawn from a seed derived from the problem name
//! (dtype included), so every kernel gets the same inputs, whatever `--quick`, `--kernel` or
//! `--filter` select. Problems with more than [`FULL_CHECK_MAX_WORK`] multiply-adds per matrix
//! product are compared on sampled rows only. Outputs and log-sum-exps are judged beyond the
//! reference's allowance for f32 score rounding
//! ([`ErrorStats::compare_allowing_score_rounding`]).

use std::cmp::Reverse;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use wgpu_attention::random::SplitMix64;
use wgpu_attention::validate::{ErrorStats, Tolerance, naive_f16_attention};
use wgpu_attention::{
    AttentionInputs, AttentionProblem, AttentionShape, Causal, Context, Dtype, Error, Kernel,
    KeyLengths, Layout, OwnedInputs, Strides, TensorStrides, f16, reference,
};

/// Query and key/value lengths of the odd-length part, which uses every pair.
const SEQ_LENS: [usize; 5] = [1, 3, 17, 113, 203];

/// Key/value lengths of the decoding part, each with one query.
const DECODE_SEQ_KV: [usize; 3] = [1024, 4096, 16384];

const HEAD_DIMS: [usize; 10] = [1, 3, 32, 40, 59, 64, 80, 111, 128, 256];

/// Query heads per key/value head. The grid has 1 or 2 key/value heads.
const GQA_RATIOS: [usize; 4] = [1, 4, 8, 16];

const CAUSALS: [Causal; 3] = [Causal::None, Causal::TopLeft, Causal::BottomRight];

const MASKS: [MaskKind; 3] = [
    MaskKind::None,
    MaskKind::Broadcast,
    MaskKind::PerBatchAndHead,
];

const SOFTCAPS: [Option<f64>; 2] = [None, Some(30.0)];

/// Sliding windows as (left, right) keys around the bottom-right diagonal, `None` for unbounded.
const WINDOWS: [(Option<usize>, Option<usize>); 3] =
    [(None, None), (Some(16), Some(0)), (Some(8), Some(8))];

/// Combinations of [`CAUSALS`], [`MASKS`], [`SOFTCAPS`] and [`WINDOWS`].
const OPTION_COMBINATIONS: usize = CAUSALS.len() * MASKS.len() * SOFTCAPS.len() * WINDOWS.len();

/// (seq_q, seq_kv, head_dim) of the shapes that get every option combination and ratio.
const PRODUCT_SHAPES: [(usize, usize, usize); 2] = [(17, 113, 59), (113, 17, 40)];

const DTYPES: [Dtype; 2] = [Dtype::F32, Dtype::F16];

/// (head_dim, head_dim_v) pairs of the variant part: equal, 192/128 and 40/72 heads, and the
/// 576/512 heads of multi-head latent attention.
const VARIANT_HEAD_DIMS: [(usize, usize); 4] = [(64, 64), (192, 128), (40, 72), (576, 512)];

/// (seq_q, seq_kv) of the variant part, the longest sequence when packed.
const VARIANT_SEQS: [(usize, usize); 3] = [(17, 113), (40, 40), (1, 203)];

/// Batch elements of the variant part, so that packed sequences and key lengths differ.
const VARIANT_BATCH: usize = 3;

/// Combinations of ALiBi, sinks, key lengths and packing: one bit each.
const VARIANT_COMBINATIONS: usize = 16;

/// Memory layouts of Q, K, V and the output in the variant part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LayoutKind {
    Bhsd,
    Bshd,
    /// BSHD with 3 unused elements after each row and 5 after each batch element, so reads that
    /// ignore the strides land in the padding.
    Padded,
}

const LAYOUTS: [LayoutKind; 3] = [LayoutKind::Bhsd, LayoutKind::Bshd, LayoutKind::Padded];

/// Kernels that `--kernel` selects by default.
const DEFAULT_KERNELS: &str = "flash-tiled,flash-rows,flash-decode,flash-subgroup,three-stage";

/// Largest `batch · heads · seq_q · seq_kv · head_dim` compared in full; larger problems are
/// compared on sampled rows.
// NOTE: an estimate, sized on a 2-core x86 machine with lavapipe so that the full grid runs in
// tens of minutes there. Rows outside the sample of a large problem go unchecked.
const FULL_CHECK_MAX_WORK: usize = 1 << 23;

/// Heads, as (batch, head) pairs, whose rows are sampled in a large problem.
const SAMPLED_HEADS: usize = 8;

/// Rows sampled in each sampled head.
const SAMPLED_ROWS_PER_HEAD: usize = 8;

/// Minimum number of quick-subset problems that use each value of [`features`] (fewer where the
/// grid has fewer).
const QUICK_COVERAGE: usize = 2;

/// Fraction of additive-mask entries that are `-inf`. The others are uniform in [-1, 1).
const MASKED_FRACTION: f64 = 0.1;

#[derive(clap::Args)]
pub(crate) struct ValidateArgs {
    /// Run only the quick subset: a few problems that together use every sequence length, head
    /// dim, ratio, causal mode, mask kind, softcap, window, layout, ALiBi, sink, key-length and
    /// packing option of the grid at least twice, in both dtypes.
    #[arg(long)]
    quick: bool,
    /// Kernels to validate, comma-separated: flash-tiled, flash-rows, flash-decode,
    /// flash-subgroup, three-stage, flash (the fused program chosen for the adapter), auto, or
    /// all (the five programs, the default).
    #[arg(long, default_value = DEFAULT_KERNELS, value_parser = parse_kernels)]
    kernel: KernelList,
    /// Adapter: a part of its name or a backend (vulkan, metal, dx12, gl). Defaults to
    /// WGPU_ATTENTION_ADAPTER, then to the best adapter found.
    #[arg(long)]
    adapter: Option<String>,
    /// Run only the cases whose name (problem name, a space, kernel) contains this text, e.g.
    /// `_d59_`, `causal-br`, `_f16 three-stage`.
    #[arg(long, value_name = "TEXT")]
    filter: Option<String>,
    /// Print one JSON object per case instead of text, and the case count and summary to stderr.
    #[arg(long)]
    json: bool,
    /// Print the selected case names and their count without running them.
    #[arg(long)]
    list: bool,
}

/// The kernels named by `--kernel`, in order and without repeats.
#[derive(Clone, Debug)]
struct KernelList(Vec<Kernel>);

fn parse_kernels(text: &str) -> Result<KernelList, String> {
    let mut kernels = Vec::new();
    for name in text.split(',').map(str::trim) {
        if name == "all" {
            for kernel in parse_kernels(DEFAULT_KERNELS)?.0 {
                if !kernels.contains(&kernel) {
                    kernels.push(kernel);
                }
            }
            continue;
        }
        if name == "reference" {
            return Err(
                "validate judges each kernel against the f64 reference, so `reference` is no \
                 kernel to validate; `check --kernel reference` compares it with fixture files"
                    .to_string(),
            );
        }
        let kernel = Kernel::from_name(name).ok_or_else(|| {
            format!(
                "unknown kernel `{name}`; expected flash-tiled, flash-rows, flash-decode, \
                 flash-subgroup, three-stage, flash, auto or all, comma-separated"
            )
        })?;
        if !kernels.contains(&kernel) {
            kernels.push(kernel);
        }
    }
    Ok(KernelList(kernels))
}

/// The kinds of additive mask in the grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MaskKind {
    None,
    /// One `[1, 1, seq_q, seq_kv]` mask for every batch element and head.
    Broadcast,
    /// A `[batch, heads, seq_q, seq_kv]` mask.
    PerBatchAndHead,
}

/// The masking options of one problem.
#[derive(Clone, Copy, Debug)]
struct Options {
    causal: Causal,
    mask: MaskKind,
    softcap: Option<f64>,
    window: (Option<usize>, Option<usize>),
}

impl Options {
    /// Decodes combination number `index` (taken modulo [`OPTION_COMBINATIONS`]).
    fn from_index(index: usize) -> Self {
        let index = index % OPTION_COMBINATIONS;
        let (causal, rest) = (index % CAUSALS.len(), index / CAUSALS.len());
        let (mask, rest) = (rest % MASKS.len(), rest / MASKS.len());
        let (softcap, window) = (rest % SOFTCAPS.len(), rest / SOFTCAPS.len());
        Self {
            causal: CAUSALS[causal],
            mask: MASKS[mask],
            softcap: SOFTCAPS[softcap],
            window: WINDOWS[window],
        }
    }
}

/// Sizes of one problem. [`make_problem`] raises `batch` to 2 for a per-batch-and-head mask.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    ratio: usize,
    kv_heads: usize,
    seq_q: usize,
    seq_kv: usize,
    head_dim: usize,
}

fn make_problem(dims: Dims, options: Options) -> AttentionProblem {
    let batch = if options.mask == MaskKind::PerBatchAndHead {
        dims.batch.max(2)
    } else {
        dims.batch
    };
    let heads = dims.ratio * dims.kv_heads;
    let shape = AttentionShape::new(batch, heads, dims.seq_q, dims.seq_kv, dims.head_dim)
        .with_kv_heads(dims.kv_heads);
    let mut problem = AttentionProblem::new(shape)
        .with_causal(options.causal)
        .with_window(options.window.0, options.window.1);
    if let Some(softcap) = options.softcap {
        problem = problem.with_softcap(softcap);
    }
    match options.mask {
        MaskKind::None => problem,
        MaskKind::Broadcast => problem.with_mask(1, 1),
        MaskKind::PerBatchAndHead => problem.with_mask(batch, heads),
    }
}

/// Builds every pair of [`SEQ_LENS`] × every head dim. Stepping the option index by 7 per head
/// dim (7 is coprime to the 54 combinations) gives each sequence-length pair ten different option combinations.
fn odd_length_problems() -> Vec<AttentionProblem> {
    let pairs = SEQ_LENS
        .iter()
        .flat_map(|&seq_q| SEQ_LENS.iter().map(move |&seq_kv| (seq_q, seq_kv)));
    let mut problems = Vec::new();
    for (pair_index, (seq_q, seq_kv)) in pairs.enumerate() {
        for (dim_index, &head_dim) in HEAD_DIMS.iter().enumerate() {
            let dims = Dims {
                batch: 1 + (pair_index + dim_index) % 2,
                ratio: GQA_RATIOS[(pair_index + dim_index) % GQA_RATIOS.len()],
                kv_heads: 1 + (pair_index + dim_index / GQA_RATIOS.len()) % 2,
                seq_q,
                seq_kv,
                head_dim,
            };
            let options = Options::from_index(7 * dim_index + 11 * pair_index);
            problems.push(make_problem(dims, options));
        }
    }
    problems
}

/// Builds every option combination × every ratio on each of [`PRODUCT_SHAPES`].
fn option_product_problems() -> Vec<AttentionProblem> {
    let mut problems = Vec::new();
    for (shape_index, &(seq_q, seq_kv, head_dim)) in PRODUCT_SHAPES.iter().enumerate() {
        for combination in 0..OPTION_COMBINATIONS {
            for (ratio_index, &ratio) in GQA_RATIOS.iter().enumerate() {
                let dims = Dims {
                    batch: 1 + (combination + shape_index) % 2,
                    ratio,
                    kv_heads: 1 + (combination + ratio_index) % 2,
                    seq_q,
                    seq_kv,
                    head_dim,
                };
                problems.push(make_problem(dims, Options::from_index(combination)));
            }
        }
    }
    problems
}

/// Builds decoding problems: one query over each of [`DECODE_SEQ_KV`] keys × every head dim ×
/// every ratio. Stepping the option index by 5 (coprime to the 54 combinations) gives the 40
/// problems of one key count 40 different option combinations.
fn decode_problems() -> Vec<AttentionProblem> {
    let mut problems = Vec::new();
    for (kv_index, &seq_kv) in DECODE_SEQ_KV.iter().enumerate() {
        for (dim_index, &head_dim) in HEAD_DIMS.iter().enumerate() {
            for (ratio_index, &ratio) in GQA_RATIOS.iter().enumerate() {
                let dims = Dims {
                    batch: 1,
                    ratio,
                    kv_heads: 1 + dim_index % 2,
                    seq_q: 1,
                    seq_kv,
                    head_dim,
                };
                let index = dim_index * GQA_RATIOS.len() + ratio_index;
                let options = Options::from_index(5 * index + kv_index);
                problems.push(make_problem(dims, options));
            }
        }
    }
    problems
}

/// Query and key lengths of the long-prefill part: with 8 query heads, over the 8 Mi scores from
/// which the subgroup program takes 4 rows per invocation at head dim 64 and 2 at 128. Both are
/// odd, so the last block of rows and the last step of keys are partial.
const LONG_PREFILL: (usize, usize) = (1029, 1031);

/// Builds the long-prefill part: [`LONG_PREFILL`] with 8 query heads over 2 key/value heads, at
/// head dims 64 and 128, without and with the bottom-right causal mask.
fn long_prefill_problems() -> Vec<AttentionProblem> {
    let mut problems = Vec::new();
    for head_dim in [64, 128] {
        for causal in [Causal::None, Causal::BottomRight] {
            let (seq_q, seq_kv) = LONG_PREFILL;
            let shape = AttentionShape::new(1, 8, seq_q, seq_kv, head_dim).with_kv_heads(2);
            problems.push(AttentionProblem::new(shape).with_causal(causal));
        }
    }
    problems
}

/// Sequence lengths of the long packed part, as (query, key) lengths per sequence, and the query
/// heads over 4 key/value heads. On llvmpipe, the key splits count the decoding and subgroup
/// programs' loops as NIR unrolls them without wgpu's bounds checks. Built with the checks, as
/// packed sequences once were, one split of the first sequence of each problem passed the
/// driver's loop cap.
const LONG_PACKED: [([(usize, usize); 2], usize); 2] =
    [([(1, 8192), (1, 3001)], 16), ([(64, 4096), (17, 1031)], 4)];

/// One-key sequences that follow those of [`LONG_PACKED`]. With them each problem has at least
/// 128 workgroups, the most that the split rule targets on any machine, so no split for
/// parallelism shortens the first sequence's key range.
const LONG_PACKED_SHORT: usize = 30;

/// Builds the long packed part: each entry of [`LONG_PACKED`] at head dim 128, without and with
/// ALiBi slopes and sinks.
fn long_packed_problems() -> Vec<GridProblem> {
    let mut problems = Vec::new();
    for (long, heads) in LONG_PACKED {
        for variants in [false, true] {
            let mut lengths = long.to_vec();
            lengths.resize(long.len() + LONG_PACKED_SHORT, (1, 1));
            let (seq_q, seq_kv) = long[0];
            let (total_q, total_kv) = packed_totals(&lengths);
            let shape =
                AttentionShape::new(lengths.len(), heads, seq_q, seq_kv, 128).with_kv_heads(4);
            let problem = AttentionProblem::new(shape)
                .with_causal(Causal::BottomRight)
                .with_packed(total_q, total_kv);
            let extras = Extras {
                alibi: variants,
                sinks: variants,
                kv_lens: false,
                packed: Some(lengths),
            };
            problems.push(GridProblem { problem, extras });
        }
    }
    problems
}

/// The variants that live in the inputs rather than in the problem.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Extras {
    alibi: bool,
    sinks: bool,
    kv_lens: bool,
    /// (query, key) lengths of the packed sequences, when the batch is packed.
    packed: Option<Vec<(usize, usize)>>,
}

/// One problem of the grid with the input variants it uses.
#[derive(Clone, Debug)]
struct GridProblem {
    problem: AttentionProblem,
    extras: Extras,
}

impl GridProblem {
    fn plain(problem: AttentionProblem) -> Self {
        Self {
            problem,
            extras: Extras::default(),
        }
    }
}

/// Builds the variant part: every combination of the input variants × every layout × every pair
/// of [`VARIANT_HEAD_DIMS`]. Lengths, ratios and masking options rotate with coprime steps.
fn variant_problems() -> Vec<GridProblem> {
    let mut problems = Vec::new();
    for combination in 0..VARIANT_COMBINATIONS {
        for (layout_index, &layout) in LAYOUTS.iter().enumerate() {
            for (dim_index, &(head_dim, head_dim_v)) in VARIANT_HEAD_DIMS.iter().enumerate() {
                let index = (combination * LAYOUTS.len() + layout_index) * 4 + dim_index;
                let (seq_q, seq_kv) = VARIANT_SEQS[index % VARIANT_SEQS.len()];
                let dims = Dims {
                    batch: VARIANT_BATCH,
                    ratio: GQA_RATIOS[(index / VARIANT_SEQS.len()) % GQA_RATIOS.len()],
                    kv_heads: 1 + (combination / 2) % 2,
                    seq_q,
                    seq_kv,
                    head_dim,
                };
                let mut problem = make_problem(dims, Options::from_index(7 * index + combination));
                problem.shape = problem.shape.with_head_dim_v(head_dim_v);
                let packed = (combination & 8 != 0).then(|| packed_lengths(seq_q, seq_kv, index));
                if let Some(lengths) = &packed {
                    let (total_q, total_kv) = packed_totals(lengths);
                    problem = problem.with_packed(total_q, total_kv);
                }
                problem = problem.with_layout(layout_for(layout, &problem));
                let extras = Extras {
                    alibi: combination & 1 != 0,
                    sinks: combination & 2 != 0,
                    kv_lens: combination & 4 != 0,
                    packed,
                };
                // Half of the problems with key lengths let them place the diagonals.
                if extras.kv_lens && dim_index % 2 == 1 {
                    problem = problem.with_key_lengths(KeyLengths::Cache);
                }
                problems.push(GridProblem { problem, extras });
            }
        }
    }
    problems
}

/// Returns the query rows and keys of packed sequences of these (query, key) lengths, in all.
fn packed_totals(lengths: &[(usize, usize)]) -> (usize, usize) {
    lengths
        .iter()
        .fold((0, 0), |(rows, keys), &(q, kv)| (rows + q, keys + kv))
}

/// Lengths of [`VARIANT_BATCH`] packed sequences: the longest, a shorter one, and either one
/// query or no query at all.
fn packed_lengths(seq_q: usize, seq_kv: usize, index: usize) -> Vec<(usize, usize)> {
    let last = if index.is_multiple_of(2) { 0 } else { 1 };
    vec![
        (seq_q, seq_kv),
        (seq_q.div_ceil(2), seq_kv / 3 + 1),
        (last.min(seq_q), seq_kv / 2 + 1),
    ]
}

/// Returns the layout of `kind` for `problem`, whose shape and packing are already set.
fn layout_for(kind: LayoutKind, problem: &AttentionProblem) -> Layout {
    match kind {
        LayoutKind::Bhsd => Layout::Bhsd,
        LayoutKind::Bshd => Layout::Bshd,
        LayoutKind::Padded => {
            let s = &problem.shape;
            let packed = problem.packed.is_some();
            let padded = |heads: usize, rows: usize, dim: usize| {
                let seq = heads * dim + 3;
                Strides {
                    batch: if packed { 0 } else { rows * seq + 5 },
                    head: dim,
                    seq,
                }
            };
            let (q_rows, kv_rows) = (problem.q_rows(), problem.kv_rows());
            Layout::Strided(TensorStrides {
                q: padded(s.heads, q_rows, s.head_dim),
                k: padded(s.kv_heads, kv_rows, s.head_dim),
                v: padded(s.kv_heads, kv_rows, s.head_dim_v),
                out: padded(s.heads, q_rows, s.head_dim_v),
            })
        }
    }
}

/// Explicit scales of the large-score part: 8 and 50, about 64 and 400 times the default
/// `1/√64`, which make scores of tens to hundreds.
const LARGE_SCALES: [f64; 2] = [8.0, 50.0];

/// Builds the large-score part: each of [`LARGE_SCALES`] at head dims 64 and 128, in prefill of
/// 33 queries over 257 keys and in decoding over 4,096 keys with the bottom-right causal mask,
/// with 4 query heads over 2 key/value heads.
fn large_score_problems() -> Vec<AttentionProblem> {
    let mut problems = Vec::new();
    for head_dim in [64, 128] {
        for scale in LARGE_SCALES {
            for (seq_q, seq_kv, causal) in [(33, 257, Causal::None), (1, 4096, Causal::BottomRight)]
            {
                let shape = AttentionShape::new(1, 4, seq_q, seq_kv, head_dim).with_kv_heads(2);
                let problem = AttentionProblem::new(shape)
                    .with_scale(scale)
                    .with_causal(causal);
                problems.push(problem);
            }
        }
    }
    problems
}

/// Builds every problem of the grid in f32, without repeats.
fn grid_problems() -> Vec<GridProblem> {
    let mut seen = HashSet::new();
    let mut problems: Vec<GridProblem> = odd_length_problems()
        .into_iter()
        .chain(option_product_problems())
        .chain(decode_problems())
        .chain(long_prefill_problems())
        .chain(large_score_problems())
        .map(GridProblem::plain)
        .collect();
    problems.extend(variant_problems());
    problems.extend(long_packed_problems());
    for grid in &mut problems {
        reveal_keys(grid);
    }
    problems.retain(|grid| seen.insert(problem_name(&grid.problem, &grid.extras)));
    problems
}

/// Gives the bottom-right causal mask to a problem whose top-left causal mask and sliding window
/// leave no query a key. The window follows the bottom-right diagonal, so with many more keys
/// than queries the two never meet (in 119 of the 1,005 problems before this step). Such a
/// problem would test fully masked rows only, and the additive masks already bring those.
fn reveal_keys(grid: &mut GridProblem) {
    let problem = &grid.problem;
    if problem.causal == Causal::TopLeft && rows_with_keys(problem, &grid.extras) == 0 {
        grid.problem = grid.problem.with_causal(Causal::BottomRight);
    }
}

/// Extends [`AttentionProblem::label`] with soft-capping, the window and the input variants,
/// then the dtype, so that every problem of the grid has its own name, e.g.
/// `b2_h8_hkv2_q17_kv113_d59_cap30_win16-0_f16`.
fn problem_name(problem: &AttentionProblem, extras: &Extras) -> String {
    let mut name = problem.with_dtype(Dtype::F32).label();
    if let Some(scale) = problem.scale {
        name.push_str(&format!("_scale{scale}"));
    }
    if let Some(softcap) = problem.softcap {
        name.push_str(&format!("_cap{softcap}"));
    }
    let window = problem.window;
    if window.left.is_some() || window.right.is_some() {
        let side = |bound: Option<usize>| bound.map_or("inf".to_string(), |keys| keys.to_string());
        name.push_str(&format!("_win{}-{}", side(window.left), side(window.right)));
    }
    for (used, tag) in [
        (extras.alibi, "_alibi"),
        (extras.sinks, "_sinks"),
        (extras.kv_lens, "_kvlens"),
    ] {
        if used {
            name.push_str(tag);
        }
    }
    if problem.dtype == Dtype::F16 {
        name.push_str("_f16");
    }
    name
}

/// Returns the option values a problem uses, for choosing the quick subset.
fn features(grid: &GridProblem) -> Vec<String> {
    let (problem, extras) = (&grid.problem, &grid.extras);
    let s = &problem.shape;
    let layout = match problem.layout {
        Layout::Bhsd => "bhsd",
        Layout::Bshd => "bshd",
        Layout::Strided(_) => "strided",
    };
    let mask = match problem.mask {
        None => "none",
        Some(mask) if mask.batch == 1 && mask.heads == 1 => "broadcast",
        Some(_) => "per-batch-and-head",
    };
    vec![
        format!("batch={}", s.batch),
        format!("seq_q={}", s.seq_q),
        format!("seq_kv={}", s.seq_kv),
        format!("seq_q>seq_kv={}", s.seq_q > s.seq_kv),
        format!("head_dim={}", s.head_dim),
        format!("ratio={}", s.group_size()),
        format!("kv_heads={}", s.kv_heads),
        format!("causal={}", problem.causal.name()),
        format!("mask={mask}"),
        format!("scale={:?}", problem.scale),
        format!("softcap={:?}", problem.softcap),
        format!("window={:?}", problem.window),
        format!("sampled={}", sampled(problem)),
        format!("head_dim_v={}", s.head_dim_v),
        format!("layout={layout}"),
        format!("alibi={}", extras.alibi),
        format!("sinks={}", extras.sinks),
        format!("kv_lens={}", extras.kv_lens),
        format!("key_lengths={:?}", problem.key_lengths),
        format!("packed={}", extras.packed.is_some()),
    ]
}

/// Returns whether a problem is compared on sampled rows: a large one in the dense default
/// layout.
fn sampled(problem: &AttentionProblem) -> bool {
    work(problem) > FULL_CHECK_MAX_WORK
        && problem.layout == Layout::Bhsd
        && problem.packed.is_none()
}

/// Returns the multiply-adds of one matrix product, `batch · heads · seq_q · seq_kv · head_dim`.
fn work(problem: &AttentionProblem) -> usize {
    let s = &problem.shape;
    s.batch * s.heads * s.seq_q * s.seq_kv * s.head_dim
}

/// Marks a small set of problems that together use every value of [`features`] at least
/// [`QUICK_COVERAGE`] times: greedily the problem that adds the most missing uses, the cheaper
/// one on a tie.
fn quick_subset(problems: &[GridProblem]) -> Vec<bool> {
    let problem_features: Vec<Vec<String>> = problems.iter().map(features).collect();
    let mut uses: HashMap<&str, usize> = HashMap::new();
    let mut chosen = vec![false; problems.len()];
    loop {
        let missing_uses = |index: usize| {
            problem_features[index]
                .iter()
                .filter(|value| uses.get(value.as_str()).copied().unwrap_or(0) < QUICK_COVERAGE)
                .count()
        };
        let best = (0..problems.len())
            .filter(|&index| !chosen[index])
            .max_by_key(|&index| (missing_uses(index), Reverse(work(&problems[index].problem))));
        match best {
            Some(index) if missing_uses(index) > 0 => {
                chosen[index] = true;
                for value in &problem_features[index] {
                    *uses.entry(value.as_str()).or_default() += 1;
                }
            }
            _ => return chosen,
        }
    }
}

/// One problem in one dtype, with the kernels selected for it.
struct CaseGroup {
    problem: AttentionProblem,
    extras: Extras,
    name: String,
    seed: u64,
    kernels: Vec<Kernel>,
}

impl CaseGroup {
    fn case_names(&self) -> impl Iterator<Item = String> + '_ {
        self.kernels
            .iter()
            .map(|kernel| format!("{} {}", self.name, kernel.name()))
    }
}

/// Builds the selected cases, grouped by problem and dtype so that inputs and the reference are
/// computed once per group.
fn select_cases(args: &ValidateArgs) -> Vec<CaseGroup> {
    let problems = grid_problems();
    let quick = quick_subset(&problems);
    let mut groups = Vec::new();
    for (grid, in_quick) in problems.iter().zip(quick) {
        if args.quick && !in_quick {
            continue;
        }
        for dtype in DTYPES {
            let problem = grid.problem.with_dtype(dtype);
            let name = problem_name(&problem, &grid.extras);
            let kernels: Vec<Kernel> = args
                .kernel
                .0
                .iter()
                .copied()
                .filter(|kernel| {
                    let case_name = format!("{name} {}", kernel.name());
                    args.filter
                        .as_deref()
                        .is_none_or(|filter| case_name.contains(filter))
                })
                .collect();
            if !kernels.is_empty() {
                let seed = seed_for(&name);
                groups.push(CaseGroup {
                    problem,
                    extras: grid.extras.clone(),
                    name,
                    seed,
                    kernels,
                });
            }
        }
    }
    groups
}

/// Derives a case's seed from its problem name (64-bit FNV-1a).
fn seed_for(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The inputs of one case group. For f16, `q`, `k` and `v` contain the f16 values widened to
/// f32, so that the reference gets exactly the kernel's inputs.
struct CaseData {
    tensors: OwnedInputs,
    /// The same inputs with Q, K and V in f16, for f16 problems.
    half: Option<OwnedInputs<f16>>,
}

impl CaseData {
    /// Draws Q, K and V over the span their layout addresses, the mask, and the input variants
    /// that `extras` selects. These are the ALiBi slopes of a model with this many heads, sinks
    /// in [-2, 2), key lengths of full, about a third and none, and the packed offsets.
    fn generate(problem: &AttentionProblem, extras: &Extras, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let s = &problem.shape;
        let mut draw = |len: usize| (0..len).map(|_| rng.symmetric()).collect::<Vec<f32>>();
        let [q_len, k_len, v_len, _] = problem.spans();
        let (q, k, v) = (draw(q_len), draw(k_len), draw(v_len));
        let mask = problem.mask.map(|_| generate_mask(problem, &mut rng));
        let alibi_slopes = extras.alibi.then(|| {
            (0..s.heads)
                .map(|h| 2f32.powf(-8.0 * (h + 1) as f32 / s.heads as f32))
                .collect()
        });
        let sinks = extras
            .sinks
            .then(|| (0..s.heads).map(|_| 2.0 * rng.symmetric()).collect());
        let SequenceLengths {
            kv_seq_lens,
            cu_seqlens,
        } = SequenceLengths::of(problem, extras);
        let mut tensors = OwnedInputs {
            q,
            k,
            v,
            mask,
            alibi_slopes,
            sinks,
            kv_seq_lens,
            cu_seqlens,
        };
        let half = (problem.dtype == Dtype::F16).then(|| tensors.round_to_f16());
        Self { tensors, half }
    }

    fn inputs(&self) -> AttentionInputs<'_> {
        self.tensors.inputs()
    }
}

/// The key lengths and packed offsets of a problem's inputs.
struct SequenceLengths {
    kv_seq_lens: Option<Vec<u32>>,
    cu_seqlens: Option<(Vec<u32>, Vec<u32>)>,
}

impl SequenceLengths {
    /// Key lengths of full, about a third and none, by batch element, and the offsets of the
    /// packed sequences, as far as `extras` selects them.
    fn of(problem: &AttentionProblem, extras: &Extras) -> Self {
        let s = &problem.shape;
        let kv_seq_lens = extras.kv_lens.then(|| {
            (0..s.batch)
                .map(|b| match b % 3 {
                    0 => s.seq_kv as u32,
                    1 => (s.seq_kv / 3) as u32,
                    _ => 0,
                })
                .collect()
        });
        let offsets = |lengths: &mut dyn Iterator<Item = usize>| {
            std::iter::once(0)
                .chain(lengths.scan(0, |total, len| {
                    *total += len as u32;
                    Some(*total)
                }))
                .collect::<Vec<u32>>()
        };
        let cu_seqlens = extras.packed.as_ref().map(|lengths| {
            (
                offsets(&mut lengths.iter().map(|l| l.0)),
                offsets(&mut lengths.iter().map(|l| l.1)),
            )
        });
        Self {
            kv_seq_lens,
            cu_seqlens,
        }
    }
}

/// Counts the query rows (of one head) to which the causal mask, the sliding window and the key
/// lengths leave at least one key, before any additive mask.
fn rows_with_keys(problem: &AttentionProblem, extras: &Extras) -> usize {
    let lengths = SequenceLengths::of(problem, extras);
    let mut inputs = AttentionInputs::<f32>::new(&[], &[], &[]);
    if let Some(lens) = &lengths.kv_seq_lens {
        inputs = inputs.with_kv_seq_lens(lens);
    }
    if let Some((q, kv)) = &lengths.cu_seqlens {
        inputs = inputs.with_cu_seqlens(q, kv);
    }
    (0..problem.shape.batch)
        .map(|b| {
            let sequence = inputs.sequence(problem, b);
            (0..sequence.rows)
                .filter(|&i| (0..sequence.keys).any(|j| problem.allows_in(&sequence, i, j)))
                .count()
        })
        .sum()
}

/// Draws an additive mask: entries in [-1, 1), [`MASKED_FRACTION`] of them `-inf`, and the row
/// [`fully_masked_row`] of the last batch element and head all `-inf`.
fn generate_mask(problem: &AttentionProblem, rng: &mut SplitMix64) -> Vec<f32> {
    let mut mask: Vec<f32> = (0..problem.mask_len())
        .map(|_| {
            if rng.unit() < MASKED_FRACTION {
                f32::NEG_INFINITY
            } else {
                rng.symmetric()
            }
        })
        .collect();
    if let Some((b, h, i)) = fully_masked_row(problem) {
        let seq_kv = problem.shape.seq_kv;
        let (batch_stride, head_stride) = problem.mask_strides();
        let start = b * batch_stride + h * head_stride + i * seq_kv;
        mask[start..start + seq_kv].fill(f32::NEG_INFINITY);
    }
    mask
}

/// Returns the row `(b, h, i)` that the additive mask removes completely: row `seq_q / 2` of the
/// last batch element and head (of every head, with a broadcast mask). Returns `None` without a
/// mask, and when that row would be the only row of a broadcast mask, which would leave nothing
/// unmasked.
fn fully_masked_row(problem: &AttentionProblem) -> Option<(usize, usize, usize)> {
    let mask = problem.mask?;
    let s = &problem.shape;
    if s.seq_q == 1 && mask.batch == 1 && mask.heads == 1 {
        return None;
    }
    Some((s.batch - 1, s.heads - 1, s.seq_q / 2))
}

/// The reference result of one case group, on every row or on sampled rows.
struct Expected {
    /// Compared rows as flat indices `(b · heads + h) · seq_q + i`, or `None` for every row.
    rows: Option<Vec<usize>>,
    out: Vec<f64>,
    lse: Vec<f64>,
    /// The reference's sensitivities to score rounding, laid out as `out` and `lse`.
    out_score_sensitivity: Vec<f64>,
    lse_score_sensitivity: Vec<f64>,
    /// [`naive_f16_attention`] on the compared rows, for f16 problems.
    naive_f16: Option<Vec<f32>>,
}

impl Expected {
    fn compute(
        problem: &AttentionProblem,
        data: &CaseData,
        seed: u64,
    ) -> wgpu_attention::Result<Self> {
        if sampled(problem) {
            Self::compute_sampled(problem, data, sample_rows(problem, seed))
        } else {
            Self::compute_full(problem, data)
        }
    }

    fn compute_full(problem: &AttentionProblem, data: &CaseData) -> wgpu_attention::Result<Self> {
        let inputs = data.inputs();
        let expected = reference::attention(problem, &inputs)?;
        let naive_f16 = match problem.dtype {
            Dtype::F16 => Some(naive_f16_attention(problem, &inputs)?),
            Dtype::F32 => None,
        };
        Ok(Self {
            rows: None,
            out: expected.out,
            lse: expected.lse,
            out_score_sensitivity: expected.out_score_sensitivity,
            lse_score_sensitivity: expected.lse_score_sensitivity,
            naive_f16,
        })
    }

    fn compute_sampled(
        problem: &AttentionProblem,
        data: &CaseData,
        rows: Vec<usize>,
    ) -> wgpu_attention::Result<Self> {
        let inputs = data.inputs();
        let (mut out, mut lse) = (Vec::new(), Vec::new());
        let (mut out_score_sensitivity, mut lse_score_sensitivity) = (Vec::new(), Vec::new());
        for &row in &rows {
            let (b, h, i) = row_position(problem, row);
            let expected = reference::attention_row(problem, &inputs, b, h, i)?;
            out.extend_from_slice(&expected.out);
            lse.push(expected.lse);
            out_score_sensitivity.extend_from_slice(&expected.out_score_sensitivity);
            lse_score_sensitivity.push(expected.lse_score_sensitivity);
        }
        let naive_f16 = match problem.dtype {
            Dtype::F16 => Some(naive_f16_rows(problem, data, &rows)?),
            Dtype::F32 => None,
        };
        Ok(Self {
            rows: Some(rows),
            out,
            lse,
            out_score_sensitivity,
            lse_score_sensitivity,
            naive_f16,
        })
    }
}

fn row_position(problem: &AttentionProblem, row: usize) -> (usize, usize, usize) {
    let s = &problem.shape;
    let i = row % s.seq_q;
    let head = row / s.seq_q;
    (head / s.heads, head % s.heads, i)
}

/// Picks up to [`SAMPLED_HEADS`] heads: the first, the last, the last of the first key/value
/// group, and random ones. In each it picks up to [`SAMPLED_ROWS_PER_HEAD`] rows: the first, the
/// middle (which the mask removes completely in the last head), the last, and random ones.
/// Returns flat row indices, sorted.
fn sample_rows(problem: &AttentionProblem, seed: u64) -> Vec<usize> {
    let s = &problem.shape;
    let mut rng = SplitMix64::new(seed ^ 0x5a5a_5a5a_5a5a_5a5a);
    let head_count = s.batch * s.heads;
    let mut heads = vec![0, head_count - 1, s.group_size() - 1];
    for _ in 0..4 * SAMPLED_HEADS {
        heads.push(rng.below(head_count));
    }
    let heads = first_distinct(heads, SAMPLED_HEADS);
    let mut rows = Vec::new();
    for head in heads {
        let mut positions = vec![0, s.seq_q / 2, s.seq_q - 1];
        for _ in 0..4 * SAMPLED_ROWS_PER_HEAD {
            positions.push(rng.below(s.seq_q));
        }
        for i in first_distinct(positions, SAMPLED_ROWS_PER_HEAD) {
            rows.push(head * s.seq_q + i);
        }
    }
    rows.sort_unstable();
    rows
}

/// Returns the first `limit` distinct values of `values`, in order.
fn first_distinct(values: Vec<usize>, limit: usize) -> Vec<usize> {
    let mut distinct = Vec::new();
    for value in values {
        if distinct.len() == limit {
            break;
        }
        if !distinct.contains(&value) {
            distinct.push(value);
        }
    }
    distinct
}

/// Runs [`naive_f16_attention`] on each sampled head as a problem of its own (one batch element,
/// one head, every row, so causal masking and the window are unchanged) and returns the sampled
/// rows of its output.
fn naive_f16_rows(
    problem: &AttentionProblem,
    data: &CaseData,
    rows: &[usize],
) -> wgpu_attention::Result<Vec<f32>> {
    let s = &problem.shape;
    let d = s.head_dim_v;
    let mut by_head: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    let mut out = Vec::with_capacity(rows.len() * d);
    for &row in rows {
        let head = row / s.seq_q;
        let head_out = match by_head.entry(head) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(naive_f16_head(problem, data, head)?),
        };
        let i = row % s.seq_q;
        out.extend_from_slice(&head_out[i * d..(i + 1) * d]);
    }
    Ok(out)
}

/// Runs [`naive_f16_attention`] on flat head `head = b · heads + h` alone, with the head's ALiBi
/// slope and sink and the batch element's key length.
fn naive_f16_head(
    problem: &AttentionProblem,
    data: &CaseData,
    head: usize,
) -> wgpu_attention::Result<Vec<f32>> {
    let s = &problem.shape;
    let (b, h) = (head / s.heads, head % s.heads);
    let kv_head = b * s.kv_heads + h / s.group_size();
    let q_len = s.seq_q * s.head_dim;
    let (k_len, v_len) = (s.seq_kv * s.head_dim, s.seq_kv * s.head_dim_v);
    let mut single = *problem;
    single.shape =
        AttentionShape::new(1, 1, s.seq_q, s.seq_kv, s.head_dim).with_head_dim_v(s.head_dim_v);
    let mask = match (&data.tensors.mask, problem.mask) {
        (Some(mask), Some(_)) => {
            single = single.with_mask(1, 1);
            let (batch_stride, head_stride) = problem.mask_strides();
            let start = b * batch_stride + h * head_stride;
            Some(&mask[start..start + s.scores_per_head()])
        }
        _ => None,
    };
    let tensors = &data.tensors;
    let inputs = AttentionInputs {
        mask,
        alibi_slopes: tensors.alibi_slopes.as_deref().map(|slopes| &slopes[h..=h]),
        sinks: tensors.sinks.as_deref().map(|sinks| &sinks[h..=h]),
        kv_seq_lens: tensors.kv_seq_lens.as_deref().map(|lens| &lens[b..=b]),
        ..AttentionInputs::new(
            &tensors.q[head * q_len..][..q_len],
            &tensors.k[kv_head * k_len..][..k_len],
            &tensors.v[kv_head * v_len..][..v_len],
        )
    };
    naive_f16_attention(&single, &inputs)
}

/// Runs `kernel` and returns its output widened to f32, and its log-sum-exp.
fn run_kernel(
    context: &Context,
    kernel: Kernel,
    problem: &AttentionProblem,
    data: &CaseData,
) -> wgpu_attention::Result<(Vec<f32>, Vec<f32>)> {
    match &data.half {
        None => {
            let output = context.attention_with(kernel, problem, &data.inputs())?;
            Ok((output.out, output.lse))
        }
        Some(half) => {
            let output = context.attention_f16(kernel, problem, &half.inputs())?;
            let out = output.out.iter().map(|x| x.to_f32()).collect();
            Ok((out, output.lse))
        }
    }
}

/// The errors of one kernel's output against the reference.
struct Comparison {
    out: ErrorStats,
    lse: ErrorStats,
    tolerance: Tolerance,
    /// For f16: the largest error of [`naive_f16_attention`] against the reference.
    naive_f16_max_abs: Option<f64>,
    /// Rows compared, and whether they are a sample.
    rows: usize,
    sampled: bool,
}

impl Comparison {
    fn new(
        problem: &AttentionProblem,
        expected: &Expected,
        out: &[f32],
        lse: &[f32],
    ) -> Comparison {
        let d = problem.shape.head_dim_v;
        let (out, lse) = match &expected.rows {
            None => (out.to_vec(), lse.to_vec()),
            Some(rows) => {
                let out_rows = rows.iter().flat_map(|&row| &out[row * d..(row + 1) * d]);
                let lse_rows = rows.iter().map(|&row| lse[row]);
                (out_rows.copied().collect(), lse_rows.collect())
            }
        };
        let tolerance = match problem.dtype {
            Dtype::F32 => Tolerance::F32,
            Dtype::F16 => Tolerance::F16,
        };
        let naive_f16_max_abs = expected
            .naive_f16
            .as_ref()
            .map(|naive| ErrorStats::compare(naive, &expected.out).max_abs);
        Comparison {
            out: ErrorStats::compare_allowing_score_rounding(
                &out,
                &expected.out,
                &expected.out_score_sensitivity,
            ),
            lse: ErrorStats::compare_allowing_score_rounding(
                &lse,
                &expected.lse,
                &expected.lse_score_sensitivity,
            ),
            tolerance,
            naive_f16_max_abs,
            rows: lse.len(),
            sampled: expected.rows.is_some(),
        }
    }

    /// Returns why the output fails, empty when it passes. The log-sum-exp is f32 in both dtypes
    /// and is judged by [`Tolerance::F32`].
    fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        if !self.out.passes(&self.tolerance) {
            failures.push(format!("output outside tolerance ({})", self.out));
        }
        if !self.lse.passes(&Tolerance::F32) {
            failures.push(format!(
                "log-sum-exp outside the f32 tolerance ({})",
                self.lse
            ));
        }
        if let Some(limit) = self.naive_f16_limit()
            && self.out.max_abs > limit
        {
            failures.push(format!(
                "max_abs {:.2e} exceeds twice the naive f16 error, limit {limit:.2e}",
                self.out.max_abs
            ));
        }
        failures
    }

    /// Returns twice the naive f16 error, floored at one f16 epsilon of the largest output, the
    /// limit that tests/f16.rs also applies.
    fn naive_f16_limit(&self) -> Option<f64> {
        let epsilon = f64::from(f16::EPSILON.to_f32());
        self.naive_f16_max_abs
            .map(|naive| 2.0 * naive.max(epsilon * self.out.max_expected))
    }
}

/// The result of one case.
enum Outcome {
    Compared(Comparison),
    /// The kernel rejected the problem on this device, with the library's message.
    Unsupported(String),
    /// The kernel or the reference returned another error, with its message.
    Errored(String),
}

impl Outcome {
    fn from_error(error: &Error) -> Self {
        match error {
            Error::Unsupported { .. } | Error::ExceedsLimit { .. } => {
                Outcome::Unsupported(error.to_string())
            }
            _ => Outcome::Errored(error.to_string()),
        }
    }

    fn status(&self) -> Status {
        match self {
            Outcome::Compared(comparison) if comparison.failures().is_empty() => Status::Pass,
            Outcome::Compared(_) | Outcome::Errored(_) => Status::Fail,
            Outcome::Unsupported(_) => Status::Skip,
        }
    }

    fn message(&self) -> Option<String> {
        match self {
            Outcome::Compared(comparison) => {
                let failures = comparison.failures();
                (!failures.is_empty()).then(|| failures.join("; "))
            }
            Outcome::Unsupported(message) => Some(format!("unsupported: {message}")),
            Outcome::Errored(message) => Some(format!("error: {message}")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Pass,
    Fail,
    Skip,
}

/// Counts of each status.
#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
    skipped: usize,
    /// Passed f16 cases whose inputs were converted to f32 on the host.
    passed_f16_on_host: usize,
}

impl Tally {
    fn add(&mut self, status: Status) {
        match status {
            Status::Pass => self.passed += 1,
            Status::Fail => self.failed += 1,
            Status::Skip => self.skipped += 1,
        }
    }
}

/// Settings and state shared by every case of one run.
struct Session<'a> {
    context: &'a Context,
    adapter: String,
    json: bool,
    progress: ProgressBar,
    tally: Tally,
}

impl Session<'_> {
    /// Generates the inputs and the reference of one group, then runs and reports each kernel.
    fn run_group(&mut self, group: &CaseGroup) {
        self.progress.set_message(group.name.clone());
        let data = CaseData::generate(&group.problem, &group.extras, group.seed);
        let expected = Expected::compute(&group.problem, &data, group.seed);
        for &kernel in &group.kernels {
            let outcome = match &expected {
                Ok(expected) => run_case(self.context, kernel, &group.problem, &data, expected),
                Err(error) => Outcome::Errored(format!("the reference failed: {error}")),
            };
            let status = outcome.status();
            self.tally.add(status);
            if status == Status::Pass && self.f16_on_host(&group.problem) {
                self.tally.passed_f16_on_host += 1;
            }
            self.report(group, kernel, &outcome);
            self.progress.inc(1);
        }
    }

    /// Returns whether an f16 `problem` runs the f32 kernels on inputs converted on the host,
    /// because the device lacks SHADER_F16.
    fn f16_on_host(&self, problem: &AttentionProblem) -> bool {
        problem.dtype == Dtype::F16 && !self.context.features().contains(wgpu::Features::SHADER_F16)
    }

    fn report(&self, group: &CaseGroup, kernel: Kernel, outcome: &Outcome) {
        let run = CaseRun {
            kernel,
            program: kernel.resolve(&group.problem, self.context),
            f16_on_host: self.f16_on_host(&group.problem),
        };
        self.progress.suspend(|| {
            if self.json {
                println!("{}", case_json(group, &run, outcome, &self.adapter));
            } else {
                println!("{}", case_line(group, &run, outcome));
            }
        });
    }
}

fn run_case(
    context: &Context,
    kernel: Kernel,
    problem: &AttentionProblem,
    data: &CaseData,
    expected: &Expected,
) -> Outcome {
    match run_kernel(context, kernel, problem, data) {
        Ok((out, lse)) => Outcome::Compared(Comparison::new(problem, expected, &out, &lse)),
        Err(error) => Outcome::from_error(&error),
    }
}

/// The kernel of one case, the program it ran as, and where its f16 inputs were converted.
struct CaseRun {
    /// The kernel the case names.
    kernel: Kernel,
    /// The program it resolved to, which differs for `flash` and `auto`.
    program: Kernel,
    /// Whether an f16 case ran the f32 kernels on inputs converted on the host, on a device
    /// without SHADER_F16.
    f16_on_host: bool,
}

/// Formats one case as `STATUS name kernel  stats  seed`, with the tolerance and the reasons
/// after a failure, and the library's message after a skip.
fn case_line(group: &CaseGroup, run: &CaseRun, outcome: &Outcome) -> String {
    let status = match outcome.status() {
        Status::Pass => "PASS",
        Status::Fail => "FAIL",
        Status::Skip => "SKIP",
    };
    let mut line = format!("{status} {} {}", group.name, run.kernel.name());
    if run.program != run.kernel {
        line.push_str(&format!(" ({})", run.program.name()));
    }
    if run.f16_on_host {
        line.push_str(" (f16 converted on the host)");
    }
    if let Outcome::Compared(comparison) = outcome {
        line.push_str(&format!(
            "  max_abs {:.1e} nmse {:.1e}",
            comparison.out.max_abs, comparison.out.nmse
        ));
        if comparison.sampled {
            line.push_str(&format!(" ({} sampled rows)", comparison.rows));
        }
        let out = &comparison.out;
        if out.has_allowance() && out.max_abs > comparison.tolerance.abs_limit(out.max_expected) {
            // The output passes or fails by what lies beyond its score-rounding allowance.
            line.push_str(&format!(
                " (beyond score rounding max_abs {:.1e} nmse {:.1e})",
                out.max_abs_excess, out.nmse_excess
            ));
        }
        if outcome.status() == Status::Fail {
            let tolerance = &comparison.tolerance;
            line.push_str(&format!(
                "  tolerance abs {:.1e} nmse {:.1e}",
                tolerance.abs_limit(comparison.out.max_expected),
                tolerance.nmse
            ));
        }
    }
    line.push_str(&format!("  seed {:#018x}", group.seed));
    if let Some(message) = outcome.message() {
        line.push_str(&format!(" ({message})"));
    }
    line
}

fn case_json(
    group: &CaseGroup,
    run: &CaseRun,
    outcome: &Outcome,
    adapter: &str,
) -> serde_json::Value {
    let status = match outcome.status() {
        Status::Pass => "pass",
        Status::Fail => "fail",
        Status::Skip => "skip",
    };
    let comparison = match outcome {
        Outcome::Compared(comparison) => Some(comparison),
        _ => None,
    };
    let tolerance = match group.problem.dtype {
        Dtype::F32 => Tolerance::F32,
        Dtype::F16 => Tolerance::F16,
    };
    json!({
        "name": group.name,
        "kernel": run.kernel.name(),
        "program": run.program.name(),
        "f16_on_host": run.f16_on_host,
        "dtype": group.problem.dtype.name(),
        "status": status,
        "max_abs": comparison.map(|c| c.out.max_abs),
        "max_rel": comparison.map(|c| c.out.max_rel),
        "nmse": comparison.map(|c| c.out.nmse),
        "max_abs_excess": comparison.map(|c| c.out.max_abs_excess),
        "nmse_excess": comparison.map(|c| c.out.nmse_excess),
        "lse_max_abs": comparison.map(|c| c.lse.max_abs),
        "naive_f16_max_abs": comparison.and_then(|c| c.naive_f16_max_abs),
        "rows": comparison.map(|c| c.rows),
        "sampled": comparison.map(|c| c.sampled),
        "tolerance": { "abs": tolerance.abs, "nmse": tolerance.nmse },
        // Hex text, as the text lines print it: JSON readers that parse numbers as f64 lose
        // the low bits of seeds above 2^53.
        "seed": format!("{:#018x}", group.seed),
        "message": outcome.message(),
        "adapter": adapter,
    })
}

/// Creates a progress bar on stderr, hidden for `--json`. indicatif draws nothing when stderr is
/// not a terminal.
fn progress_bar(total: usize, json: bool) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}] {msg}")
        .expect("the progress bar template is valid");
    ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr())
        .with_style(style)
}

fn print_list(groups: &[CaseGroup], count: usize) {
    for group in groups {
        for name in group.case_names() {
            println!("{name}");
        }
    }
    println!("{count} cases");
}

pub(crate) fn run(args: &ValidateArgs) -> Result<ExitCode, Error> {
    let groups = select_cases(args);
    let count: usize = groups.iter().map(|group| group.kernels.len()).sum();
    if args.list {
        print_list(&groups, count);
        return Ok(ExitCode::SUCCESS);
    }
    if count == 0 {
        eprintln!(
            "error: no case name contains `{}`; `wgpu-attention validate --list` prints the names",
            args.filter.as_deref().unwrap_or_default()
        );
        return Ok(ExitCode::FAILURE);
    }

    let context = crate::open_context(args.adapter.as_deref())?;
    let adapter = crate::adapter_label(&context);
    print_status(args.json, &format!("adapter: {adapter}, {count} cases"));
    let mut session = Session {
        context: &context,
        adapter,
        json: args.json,
        progress: progress_bar(count, args.json),
        tally: Tally::default(),
    };
    for group in &groups {
        session.run_group(group);
    }
    session.progress.finish_and_clear();

    let tally = &session.tally;
    if tally.passed_f16_on_host > 0 {
        // The summary counts them as passes, but no f16 program ran on the device.
        print_status(
            args.json,
            &format!(
                "note: {} of the passed cases are f16 cases that ran the f32 programs on inputs \
                 converted on the host, because the device lacks SHADER_F16",
                tally.passed_f16_on_host
            ),
        );
    }
    let summary = format!(
        "{} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.skipped
    );
    print_status(args.json, &summary);
    // Every skipped case gives its reason. A run that checked nothing fails, so that a script
    // looping over adapters or kernels notices one that ran no case.
    if tally.passed == 0 && tally.failed == 0 {
        eprintln!(
            "error: no case ran; see each case's reason, and pick another --adapter, --kernel \
             or --filter"
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(if tally.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Prints a header or summary line to stdout, or to stderr with `--json` so that stdout contains
/// only JSON lines.
fn print_status(json: bool, line: &str) {
    if json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_with_keys_follows_masks_and_lengths() {
        let shape = AttentionShape::new(3, 4, 17, 113, 8);
        let windowed = AttentionProblem::new(shape).with_window(Some(8), Some(8));
        let extras = Extras::default();
        assert_eq!(rows_with_keys(&windowed, &extras), 3 * 17);
        let top_left = windowed.with_causal(Causal::TopLeft);
        assert_eq!(rows_with_keys(&top_left, &extras), 0);
        // Key lengths of 113, 37 and 0 with the diagonal at the cache's end: the first two batch
        // elements keep every row, and top-left masking still meets no window.
        let cache = windowed
            .with_causal(Causal::BottomRight)
            .with_key_lengths(KeyLengths::Cache);
        let with_lens = Extras {
            kv_lens: true,
            ..Extras::default()
        };
        assert_eq!(rows_with_keys(&cache, &with_lens), 2 * 17);
        let cache_top_left = cache.with_causal(Causal::TopLeft);
        assert_eq!(rows_with_keys(&cache_top_left, &with_lens), 0);
    }

    #[test]
    fn every_grid_problem_leaves_some_row_a_key() {
        let problems = grid_problems();
        let hidden: Vec<String> = problems
            .iter()
            .filter(|grid| rows_with_keys(&grid.problem, &grid.extras) == 0)
            .map(|grid| problem_name(&grid.problem, &grid.extras))
            .collect();
        assert!(hidden.is_empty(), "{hidden:#?}");
    }

    #[test]
    fn quick_subset_has_each_large_scale() {
        let problems = grid_problems();
        let quick = quick_subset(&problems);
        for scale in LARGE_SCALES {
            let named: Vec<String> = problems
                .iter()
                .zip(&quick)
                .filter(|(grid, _)| grid.problem.scale == Some(scale))
                .map(|(grid, &in_quick)| (problem_name(&grid.problem, &grid.extras), in_quick))
                .filter(|(_, in_quick)| *in_quick)
                .map(|(name, _)| name)
                .collect();
            assert!(!named.is_empty(), "no quick problem at scale {scale}");
            let tag = format!("_scale{scale}");
            assert!(named.iter().all(|name| name.contains(&tag)), "{named:?}");
        }
    }

    #[test]
    fn naive_rows_match_whole_naive_baseline() {
        // Sampled f16 problems take the naive baseline head by head, which must pass each head
        // its ALiBi slope, sink and key length as the whole problem does.
        let shape = AttentionShape::new(2, 4, 5, 40, 16).with_kv_heads(2);
        let problem = AttentionProblem::new(shape)
            .with_causal(Causal::BottomRight)
            .with_key_lengths(KeyLengths::Cache)
            .with_mask(1, 4)
            .with_dtype(Dtype::F16);
        let extras = Extras {
            alibi: true,
            sinks: true,
            kv_lens: true,
            packed: None,
        };
        let data = CaseData::generate(&problem, &extras, 5);
        let whole = naive_f16_attention(&problem, &data.inputs()).unwrap();
        let rows: Vec<usize> = (0..2 * 4 * 5).step_by(3).collect();
        let by_head = naive_f16_rows(&problem, &data, &rows).unwrap();
        let d = shape.head_dim_v;
        for (n, &row) in rows.iter().enumerate() {
            let expected = &whole[row * d..(row + 1) * d];
            let got = &by_head[n * d..(n + 1) * d];
            assert!(
                expected
                    .iter()
                    .zip(got)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "row {row}: {got:?} against {expected:?}"
            );
        }
    }
}
