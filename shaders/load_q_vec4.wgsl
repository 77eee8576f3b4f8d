// Query reads for the row programs whose Q rows come in groups of 4: the head dim and every Q
// stride are multiples of 4, so `q` is an array of vec4s. It goes with every row-load file but
// the scalar `load_rows.wgsl`, which reads Q one element at a time.
alias QElement = vec4<Storage>;

// Reads the vec4 column `c4` of the query row at element offset `base`, a multiple of 4, and
// scales it here, once, instead of in every score. One vector read in place of four scalar ones
// also shortens llvmpipe's compile: the 4-row decoding program at head dim 128 unrolls 128 of
// these reads.
fn load_q(base: u32, c4: u32) -> vec4<f32> {
    return params.scale * vec4<f32>(q[base / 4u + c4]);
}
