//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::sync::OnceLock;

use wgpu_attention::Context;

/// One context for the whole test binary, so pipelines compile once. Fails the test, with the
/// install hint, when there is no adapter: GPU tests never pass by skipping.
pub fn context() -> &'static Context {
    static CONTEXT: OnceLock<Context> = OnceLock::new();
    CONTEXT.get_or_init(|| match Context::new() {
        Ok(context) => context,
        Err(error) => panic!("no GPU adapter for the tests: {error}"),
    })
}

/// A small deterministic generator (SplitMix64), so failures reproduce from the seed alone.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, len: usize, amplitude: f32) -> Vec<f32> {
        (0..len).map(|_| self.uniform() * amplitude).collect()
    }
}
