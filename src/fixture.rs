//! Attention test cases stored as safetensors files, and GPU outputs written in the same format.
//!
//! A fixture contains `q`, `k` and `v` (`[B, H, Sq, Dk]`, `[B, H_kv, Skv, Dk]` and
//! `[B, H_kv, Skv, Dv]`) and usually the expected `out` (`[B, H, Sq, Dv]`). A file without `out`
//! has inputs only, for which `check --save` writes the outputs. It may add an additive `mask`
//! (`[1 or B, 1 or H, Sq, Skv]`) and the expected `probs` and `lse`. Its string metadata map
//! has `scale` and `causal` (`none`, `top_left` or `bottom_right`), and may have `layout`, which
//! must be `BHSD`.
//!
//! `q`, `k` and `v` are all F32 or all F16, and F16 inputs are widened to f32 exactly. The
//! metadata's `input_dtype` (`f32` or `f16`) may state the same dtype. Optional metadata
//! `softcap`, `window_left`, `window_right` and `window_align` (only `bottom_right`) select
//! soft-capping and a sliding window. Optional tensors `sinks` and `alibi_slopes` (F32 `[H]`)
//! and `kv_seq_lens` (I32 `[B]`) select attention sinks, ALiBi and key lengths. Other metadata
//! keys are kept as information. Other tensors, and keys that look like misspelt option keys,
//! are listed in [`Fixture::warnings`].

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::inputs::{AttentionInputs, OwnedInputs};
use crate::problem::{AttentionProblem, AttentionShape, Causal};

/// One attention case read from a safetensors file.
#[derive(Clone, Debug)]
pub struct Fixture {
    /// The problem the file describes.
    pub problem: AttentionProblem,
    /// Q, K and V (`[batch, heads, seq, head_dim]`, widened to f32), and the mask, ALiBi
    /// slopes, sinks and key lengths the file has.
    pub tensors: OwnedInputs,
    /// Expected output, when the file has one.
    pub out: Option<Vec<f32>>,
    /// Expected softmax probabilities, `[batch, heads, seq_q, seq_kv]`, when the file has them.
    pub probs: Option<Vec<f32>>,
    /// Expected log-sum-exp, `[batch, heads, seq_q]`, when the file has it.
    pub lse: Option<Vec<f32>>,
    /// Whether the inputs were stored as f16.
    pub f16_inputs: bool,
    /// The file's metadata map.
    pub metadata: HashMap<String, String>,
    /// Tensors that the format does not define and metadata keys close to an option key's
    /// spelling, which the file may have meant as inputs: each one was ignored.
    pub warnings: Vec<String>,
}

impl Fixture {
    /// Reads and checks a fixture file.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the file cannot be read, and [`Error::Fixture`] when it is not
    /// safetensors, lacks a tensor or key, has inconsistent shapes, or selects an option that
    /// the kernels do not support.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&bytes).map_err(|message| Error::Fixture {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses fixture bytes; the error is a message without the path.
    fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let not_safetensors = |error: safetensors::SafeTensorError| {
            format!(
                "not a safetensors file ({error}); pass a fixture file with tensors q, k and v \
                 (and usually out) and the metadata that the README's fixture format lists"
            )
        };
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(not_safetensors)?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let tensors = SafeTensors::deserialize(bytes).map_err(not_safetensors)?;
        let names = tensors.names();
        if let Some(layout) = metadata.get("layout")
            && layout != "BHSD"
        {
            return Err(format!(
                "unsupported layout `{layout}`; only BHSD is supported"
            ));
        }

        let f16_inputs = input_dtype(&tensors, &metadata)?;
        let (q_dims, q) = read_tensor(&tensors, "q")?;
        let (k_dims, k) = read_tensor(&tensors, "k")?;
        let (v_dims, v) = read_tensor(&tensors, "v")?;
        let [batch, heads, seq_q, head_dim] = dims4("q", &q_dims)?;
        let [k_batch, kv_heads, seq_kv, k_head_dim] = dims4("k", &k_dims)?;
        let [_, _, _, head_dim_v] = dims4("v", &v_dims)?;
        if v_dims[..3] != k_dims[..3] {
            return Err(format!(
                "tensor `v` has shape {v_dims:?} but `k` has {k_dims:?}; they may differ only \
                 in the head dim"
            ));
        }
        if k_batch != batch || k_head_dim != head_dim {
            return Err(format!(
                "tensor `k` has shape {k_dims:?}, which does not match `q` {q_dims:?}"
            ));
        }
        let out = optional_tensor(&tensors, &names, "out", &[batch, heads, seq_q, head_dim_v])?;

        let usual_scale = 1.0 / (head_dim as f64).sqrt();
        let scale_text = required(&metadata, "scale").map_err(|missing| {
            format!(
                "{missing}; store the softmax scale the expected output was computed with, as a \
                 decimal, such as {usual_scale} for 1/sqrt({head_dim})"
            )
        })?;
        let scale: f64 = scale_text.parse().map_err(|error| {
            format!(
                "metadata `scale` = {scale_text} is not a number: {error}; store the softmax \
                 scale as a decimal, such as {usual_scale} for 1/sqrt({head_dim})"
            )
        })?;
        if !(scale as f32).is_finite() {
            return Err(format!(
                "metadata `scale` = {scale_text} is not a finite f32; store the softmax scale as \
                 a decimal, such as {usual_scale} for 1/sqrt({head_dim})"
            ));
        }
        let causal_name = required(&metadata, "causal")
            .map_err(|missing| format!("{missing}; store none, top_left or bottom_right"))?;
        let causal = Causal::from_name(causal_name).ok_or_else(|| {
            format!("metadata `causal` = {causal_name} is not one of none, top_left, bottom_right")
        })?;
        let shape = AttentionShape::new(batch, heads, seq_q, seq_kv, head_dim)
            .with_kv_heads(kv_heads)
            .with_head_dim_v(head_dim_v);
        let mut problem = AttentionProblem::new(shape)
            .with_scale(scale)
            .with_causal(causal);
        if let Some(softcap) = metadata.get("softcap") {
            let softcap = softcap.parse().map_err(|error| {
                format!("metadata `softcap` = {softcap} is not a number: {error}")
            })?;
            problem = problem.with_softcap(softcap);
        }
        let window_side = |key: &str| -> std::result::Result<Option<usize>, String> {
            metadata
                .get(key)
                .map(|value| {
                    value.parse().map_err(|error| {
                        format!("metadata `{key}` = {value} is not a non-negative integer: {error}")
                    })
                })
                .transpose()
        };
        problem = problem.with_window(window_side("window_left")?, window_side("window_right")?);
        if let Some(align) = metadata.get("window_align")
            && align != "bottom_right"
        {
            return Err(format!(
                "unsupported `window_align` = {align}; only bottom_right windows are implemented"
            ));
        }

        let mask = if names.contains(&"mask") {
            let (mask_dims, mask) = read_tensor(&tensors, "mask")?;
            let [mask_batch, mask_heads, mask_q, mask_kv] = dims4("mask", &mask_dims)?;
            if mask_q != seq_q || mask_kv != seq_kv {
                return Err(format!(
                    "tensor `mask` has shape {mask_dims:?}; its last two dimensions must be \
                     [seq_q = {seq_q}, seq_kv = {seq_kv}]"
                ));
            }
            problem = problem.with_mask(mask_batch, mask_heads);
            Some(mask)
        } else {
            None
        };
        problem.validate().map_err(|error| error.to_string())?;

        let probs = optional_tensor(&tensors, &names, "probs", &[batch, heads, seq_q, seq_kv])?;
        let lse = optional_tensor(&tensors, &names, "lse", &[batch, heads, seq_q])?;
        let alibi_slopes = optional_tensor(&tensors, &names, "alibi_slopes", &[heads])?;
        let sinks = optional_tensor(&tensors, &names, "sinks", &[heads])?;
        let kv_seq_lens = read_lengths(&tensors, &names, "kv_seq_lens", batch)?;
        let tensors = OwnedInputs {
            q,
            k,
            v,
            mask,
            alibi_slopes,
            sinks,
            kv_seq_lens,
            cu_seqlens: None,
        };
        let warnings = unknown_names(&names, &metadata);
        let fixture = Self {
            problem,
            tensors,
            out,
            probs,
            lse,
            f16_inputs,
            metadata,
            warnings,
        };
        fixture
            .inputs()
            .validate(&fixture.problem)
            .map_err(|error| error.to_string())?;
        Ok(fixture)
    }

    /// The inputs as slices for [`crate::Context::attention`] and [`crate::reference::attention`].
    pub fn inputs(&self) -> AttentionInputs<'_> {
        self.tensors.inputs()
    }
}

/// Writes a kernel's output as safetensors: tensor `out` with shape `[batch, heads, seq_q,
/// head_dim]`, and `lse` with shape `[batch, heads, seq_q]` when given.
///
/// # Errors
///
/// [`Error::LengthMismatch`] when a slice does not match the shape, [`Error::Io`] when the file
/// cannot be written.
pub fn save_output(
    path: impl AsRef<Path>,
    problem: &AttentionProblem,
    out: &[f32],
    lse: Option<&[f32]>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let s = &problem.shape;
    let out_dims = s.out_dims().to_vec();
    let lse_dims = vec![s.batch, s.heads, s.seq_q];
    let describe = |dims: &[usize]| format!("{dims:?}");
    let check = crate::inputs::check_len;
    check("out", out.len(), s.out_len(), describe(&out_dims), true)?;
    let mut tensors = vec![("out", out_dims, bytemuck::cast_slice::<f32, u8>(out))];
    if let Some(lse) = lse {
        check("lse", lse.len(), s.lse_len(), describe(&lse_dims), true)?;
        tensors.push(("lse", lse_dims, bytemuck::cast_slice::<f32, u8>(lse)));
    }
    // safetensors stores little-endian data; bytemuck gives native order, so convert on
    // big-endian machines.
    let owned: Vec<(&str, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, dims, data)| (name, dims, to_le_bytes(data)))
        .collect();
    let views = owned
        .iter()
        .map(|(name, dims, data)| {
            safetensors::tensor::TensorView::new(Dtype::F32, dims.clone(), data)
                .map(|view| (*name, view))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|error| Error::Fixture {
            path: path.display().to_string(),
            message: error.to_string(),
        })?;
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|error| Error::Fixture {
        path: path.display().to_string(),
        message: error.to_string(),
    })?;
    std::fs::write(path, bytes).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

fn to_le_bytes(native: &[u8]) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        native.to_vec()
    } else {
        native
            .chunks_exact(4)
            .flat_map(|word| word.iter().rev().copied())
            .collect()
    }
}

fn required<'a>(
    metadata: &'a HashMap<String, String>,
    key: &str,
) -> std::result::Result<&'a str, String> {
    metadata
        .get(key)
        .map(String::as_str)
        .ok_or_else(|| format!("metadata key `{key}` is missing"))
}

/// Returns whether `q`, `k` and `v` are F16, after checking that they share one dtype and that
/// the metadata's `input_dtype`, where present, names it.
fn input_dtype(
    tensors: &SafeTensors<'_>,
    metadata: &HashMap<String, String>,
) -> std::result::Result<bool, String> {
    let mut dtypes = Vec::new();
    for name in ["q", "k", "v"] {
        let view = tensors
            .tensor(name)
            .map_err(|_| format!("tensor `{name}` is missing"))?;
        dtypes.push(view.dtype());
    }
    if dtypes[1..].iter().any(|&dtype| dtype != dtypes[0]) {
        return Err(format!(
            "tensors q, k and v have dtypes {:?}, {:?} and {:?}; store all three as F32 or all \
             three as F16",
            dtypes[0], dtypes[1], dtypes[2]
        ));
    }
    let f16 = dtypes[0] == Dtype::F16;
    let stored = if f16 { "f16" } else { "f32" };
    match metadata.get("input_dtype").map(String::as_str) {
        None => {}
        Some(stated) if stated == stored => {}
        Some(stated @ ("f16" | "f32")) => {
            return Err(format!(
                "metadata `input_dtype` is `{stated}` but tensors q, k and v are {:?}; set it to \
                 `{stored}` or store the inputs as {}",
                dtypes[0],
                if stated == "f16" { "F16" } else { "F32" }
            ));
        }
        Some(stated) => {
            return Err(format!(
                "metadata `input_dtype` = {stated} is not `f32` or `f16`; set it to `{stored}`, \
                 the dtype of tensors q, k and v, or leave it out"
            ));
        }
    }
    Ok(f16)
}

/// Tensors that the format defines.
const TENSORS: [&str; 10] = [
    "q",
    "k",
    "v",
    "out",
    "mask",
    "probs",
    "lse",
    "sinks",
    "alibi_slopes",
    "kv_seq_lens",
];

/// Metadata keys that change the problem.
const OPTION_KEYS: [&str; 8] = [
    "scale",
    "causal",
    "layout",
    "input_dtype",
    "softcap",
    "window_left",
    "window_right",
    "window_align",
];

/// Lists the tensors outside [`TENSORS`], and the metadata keys that are not option keys but
/// differ from one by at most two edits once case, `-` and `_` are set aside.
fn unknown_names(tensor_names: &[&str], metadata: &HashMap<String, String>) -> Vec<String> {
    let mut warnings = Vec::new();
    let mut unknown: Vec<&str> = tensor_names
        .iter()
        .copied()
        .filter(|name| !TENSORS.contains(name))
        .collect();
    unknown.sort_unstable();
    for name in unknown {
        warnings.push(format!(
            "tensor `{name}` is not part of the fixture format and was ignored; the optional \
             tensors are mask, probs, lse, sinks, alibi_slopes and kv_seq_lens"
        ));
    }
    let mut keys: Vec<&String> = metadata.keys().collect();
    keys.sort_unstable();
    for key in keys {
        if OPTION_KEYS.contains(&key.as_str()) {
            continue;
        }
        let plain = |text: &str| -> Vec<char> {
            text.chars()
                .filter(|&c| c != '_' && c != '-')
                .map(|c| c.to_ascii_lowercase())
                .collect()
        };
        if let Some(option) = OPTION_KEYS
            .iter()
            .find(|option| edit_distance(&plain(key), &plain(option)) <= 2)
        {
            warnings.push(format!(
                "metadata key `{key}` was ignored; if it means `{option}`, rename it"
            ));
        }
    }
    warnings
}

/// Levenshtein distance between `a` and `b`.
fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.iter().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

fn dims4(name: &str, dims: &[usize]) -> std::result::Result<[usize; 4], String> {
    dims.try_into()
        .map_err(|_| format!("tensor `{name}` has shape {dims:?}; it must have 4 dimensions"))
}

/// Reads a tensor as f32, widening F16.
fn read_tensor(
    tensors: &SafeTensors<'_>,
    name: &str,
) -> std::result::Result<(Vec<usize>, Vec<f32>), String> {
    let view = tensors
        .tensor(name)
        .map_err(|_| format!("tensor `{name}` is missing"))?;
    let data = view.data();
    let values = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|bytes| f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|bytes| half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32())
            .collect(),
        other => {
            return Err(format!(
                "tensor `{name}` has dtype {other:?}; only F32 and F16 are supported"
            ));
        }
    };
    Ok((view.shape().to_vec(), values))
}

/// Reads an optional I32 tensor of `len` non-negative lengths.
fn read_lengths(
    tensors: &SafeTensors<'_>,
    names: &[&str],
    name: &str,
    len: usize,
) -> std::result::Result<Option<Vec<u32>>, String> {
    if !names.contains(&name) {
        return Ok(None);
    }
    let view = tensors
        .tensor(name)
        .map_err(|error| format!("tensor `{name}` is unreadable: {error}"))?;
    if view.dtype() != Dtype::I32 || view.shape() != [len] {
        return Err(format!(
            "tensor `{name}` has dtype {:?} and shape {:?}; expected I32 [{len}]",
            view.dtype(),
            view.shape()
        ));
    }
    view.data()
        .chunks_exact(4)
        .map(|bytes| {
            let value = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            u32::try_from(value)
                .map_err(|_| format!("tensor `{name}` holds {value}; lengths must be at least 0"))
        })
        .collect::<std::result::Result<Vec<u32>, String>>()
        .map(Some)
}

fn optional_tensor(
    tensors: &SafeTensors<'_>,
    names: &[&str],
    name: &str,
    expected: &[usize],
) -> std::result::Result<Option<Vec<f32>>, String> {
    if !names.contains(&name) {
        return Ok(None);
    }
    let (dims, values) = read_tensor(tensors, name)?;
    if dims != expected {
        return Err(format!(
            "tensor `{name}` has shape {dims:?}; expected {expected:?}"
        ));
    }
    Ok(Some(values))
}
