//! Every kernel against the f64 reference on random inputs.
//!
//! Contract, for each kernel: for every shape, head dim, head grouping, causal alignment and mask, the output and
//! log-sum-exp are within `Tolerance::F32` of the reference, and a row with every key masked
//! has output exactly 0 and log-sum-exp -inf.

mod common;

macro_rules! kernel_contract {
    ($module:ident, $kernel:expr, $max_head_dim:expr) => {
        mod $module {
            use crate::common::{assert_matches_reference, context};
            use wgpu_attention::{AttentionProblem, AttentionShape, Causal, Kernel};

            const KERNEL: Kernel = $kernel;
            /// Largest head dim the kernel supports; larger ones are tested to be rejected.
            const MAX_HEAD_DIM: usize = $max_head_dim;

            #[test]
            fn odd_lengths_every_pair() {
                let lengths = [1, 3, 17, 113, 203];
                for (n, &seq_q) in lengths.iter().enumerate() {
                    for (m, &seq_kv) in lengths.iter().enumerate() {
                        let shape = AttentionShape::new(2, 3, seq_q, seq_kv, 40);
                        let problem = AttentionProblem::new(shape);
                        let data = crate::common::random_inputs(&problem, (n * 10 + m) as u64, 0.0);
                        assert_matches_reference(KERNEL, &problem, &data.inputs());
                    }
                }
            }

            #[test]
            fn every_head_dim() {
                for (seed, head_dim) in [1, 3, 32, 40, 59, 64, 80, 111, 128, 256]
                    .into_iter()
                    .enumerate()
                {
                    let shape = AttentionShape::new(1, 2, 17, 113, head_dim);
                    let problem = AttentionProblem::new(shape);
                    let data = crate::common::random_inputs(&problem, seed as u64, 0.0);
                    if head_dim <= MAX_HEAD_DIM {
                        assert_matches_reference(KERNEL, &problem, &data.inputs());
                    } else {
                        let result = context().attention_with(KERNEL, &problem, &data.inputs());
                        assert!(result.is_err(), "head dim {head_dim} must be rejected");
                    }
                }
            }

            #[test]
            fn grouped_and_multi_query() {
                for (heads, kv_heads) in [(8, 8), (8, 4), (8, 2), (8, 1), (12, 3)] {
                    let shape = AttentionShape::new(2, heads, 17, 113, 64).with_kv_heads(kv_heads);
                    let problem = AttentionProblem::new(shape).with_causal(Causal::BottomRight);
                    let data = crate::common::random_inputs(
                        &problem,
                        (heads * 100 + kv_heads) as u64,
                        0.0,
                    );
                    assert_matches_reference(KERNEL, &problem, &data.inputs());
                }
            }

            #[test]
            fn causal_both_alignments() {
                let cases = [
                    (3, 5),
                    (5, 3),
                    (17, 17),
                    (113, 203),
                    (203, 113),
                    (1, 203),
                    (203, 1),
                ];
                for causal in [Causal::TopLeft, Causal::BottomRight] {
                    for (seed, (seq_q, seq_kv)) in cases.into_iter().enumerate() {
                        let shape = AttentionShape::new(1, 2, seq_q, seq_kv, 59);
                        let problem = AttentionProblem::new(shape).with_causal(causal);
                        let data = crate::common::random_inputs(&problem, seed as u64, 0.0);
                        assert_matches_reference(KERNEL, &problem, &data.inputs());
                    }
                }
            }

            #[test]
            fn causal_pattern_seq_q3_seq_kv5() {
                // With V = identity each output row is the row of attention probabilities, so the zero
                // pattern is the mask drawn in the `Causal` documentation.
                let shape = AttentionShape::new(1, 1, 3, 5, 5);
                let q = vec![0.0f32; shape.q_len()];
                let k = vec![0.0f32; shape.k_len()];
                let v: Vec<f32> = (0..25)
                    .map(|i| if i % 6 == 0 { 1.0 } else { 0.0 })
                    .collect();
                let inputs = wgpu_attention::AttentionInputs::new(&q, &k, &v);
                let expected_visible = [
                    (Causal::TopLeft, [1, 2, 3]),
                    (Causal::BottomRight, [3, 4, 5]),
                ];
                for (causal, visible) in expected_visible {
                    let problem = AttentionProblem::new(shape).with_causal(causal);
                    let out = context()
                        .attention_with(KERNEL, &problem, &inputs)
                        .unwrap()
                        .out;
                    for (row, &count) in visible.iter().enumerate() {
                        for key in 0..5 {
                            let expected = if key < count { 1.0 / count as f32 } else { 0.0 };
                            let got = out[row * 5 + key];
                            assert!(
                                (got - expected).abs() < 1e-6,
                                "{causal:?} row {row} key {key}: {got}"
                            );
                        }
                    }
                }
            }

            #[test]
            fn additive_masks_broadcast() {
                for (mask_batch, mask_heads) in [(1, 1), (2, 1), (1, 4), (2, 4)] {
                    let shape = AttentionShape::new(2, 4, 17, 113, 32).with_kv_heads(2);
                    let problem = AttentionProblem::new(shape).with_mask(mask_batch, mask_heads);
                    let data = crate::common::random_inputs(
                        &problem,
                        (mask_batch * 10 + mask_heads) as u64,
                        0.3,
                    );
                    assert_matches_reference(KERNEL, &problem, &data.inputs());
                }
            }

            #[test]
            fn mask_with_causal() {
                let shape = AttentionShape::new(1, 2, 113, 203, 64);
                let problem = AttentionProblem::new(shape)
                    .with_causal(Causal::TopLeft)
                    .with_mask(1, 2);
                let data = crate::common::random_inputs(&problem, 7, 0.2);
                assert_matches_reference(KERNEL, &problem, &data.inputs());
            }

            #[test]
            fn softcap_caps_large_scores() {
                // Inputs up to ±8 at head dim 64 give scaled scores near ±60; a cap of 5 bends
                // them hard, so a kernel that skipped or misplaced the cap would fail.
                let shape = AttentionShape::new(1, 2, 33, 70, 64).with_kv_heads(1);
                for (seed, causal) in [Causal::None, Causal::BottomRight].into_iter().enumerate() {
                    let problem = AttentionProblem::new(shape)
                        .with_softcap(5.0)
                        .with_causal(causal);
                    let mut data = crate::common::random_inputs(&problem, 50 + seed as u64, 0.0);
                    data.q.iter_mut().for_each(|x| *x *= 8.0);
                    data.k.iter_mut().for_each(|x| *x *= 8.0);
                    assert_matches_reference(KERNEL, &problem, &data.inputs());
                }
                let with_mask = AttentionProblem::new(shape)
                    .with_softcap(30.0)
                    .with_mask(1, 1);
                let data = crate::common::random_inputs(&with_mask, 52, 0.3);
                assert_matches_reference(KERNEL, &with_mask, &data.inputs());
            }

            #[test]
            fn sliding_windows() {
                let windows = [
                    (Some(0), Some(0)),
                    (Some(16), None),
                    (None, Some(5)),
                    (Some(40), Some(3)),
                ];
                let shapes = [(113, 203), (203, 113), (64, 64), (1, 300)];
                for (n, &(left, right)) in windows.iter().enumerate() {
                    for (m, &(seq_q, seq_kv)) in shapes.iter().enumerate() {
                        for causal in [Causal::None, Causal::BottomRight, Causal::TopLeft] {
                            let shape = AttentionShape::new(1, 2, seq_q, seq_kv, 24);
                            let problem = AttentionProblem::new(shape)
                                .with_window(left, right)
                                .with_causal(causal);
                            let data =
                                crate::common::random_inputs(&problem, (n * 10 + m) as u64, 0.0);
                            assert_matches_reference(KERNEL, &problem, &data.inputs());
                        }
                    }
                }
            }

            #[test]
            fn window_with_mask_and_padding() {
                let shape = AttentionShape::new(2, 4, 90, 90, 32).with_kv_heads(2);
                let problem = AttentionProblem::new(shape)
                    .with_window(Some(20), Some(0))
                    .with_causal(Causal::BottomRight)
                    .with_mask(2, 1);
                let mut data = crate::common::random_inputs(&problem, 60, 0.0);
                // Pad the last 30 keys of batch 1, as a key-padding mask does.
                let mask = data.mask.as_mut().unwrap();
                for row in mask[90 * 90..].chunks_mut(90) {
                    row[60..].fill(f32::NEG_INFINITY);
                }
                assert_matches_reference(KERNEL, &problem, &data.inputs());
            }

            #[test]
            fn window_rows_without_keys_are_zero() {
                // With seq_q > seq_kv and a window of 0 keys on each side, the first 15 rows'
                // diagonals fall before key 0, so they see no key at all.
                let shape = AttentionShape::new(1, 1, 20, 5, 8);
                let problem = AttentionProblem::new(shape).with_window(Some(0), Some(0));
                let data = crate::common::random_inputs(&problem, 61, 0.0);
                let gpu = context()
                    .attention_with(KERNEL, &problem, &data.inputs())
                    .unwrap();
                for i in 0..15 {
                    assert!(gpu.out[i * 8..][..8].iter().all(|&x| x == 0.0), "row {i}");
                    assert_eq!(gpu.lse[i], f32::NEG_INFINITY, "lse of row {i}");
                }
                assert_matches_reference(KERNEL, &problem, &data.inputs());
            }

            #[test]
            fn fully_masked_rows_are_zero() {
                let shape = AttentionShape::new(1, 2, 17, 113, 32);
                let problem = AttentionProblem::new(shape).with_mask(1, 2);
                let mut data = crate::common::random_inputs(&problem, 11, 0.0);
                let mask = data.mask.as_mut().unwrap();
                // Row 0 of head 0 and row 16 of head 1 see no key.
                let masked_rows = [(0, 0), (1, 16)];
                for (h, i) in masked_rows {
                    let start = (h * 17 + i) * 113;
                    mask[start..start + 113].fill(f32::NEG_INFINITY);
                }
                let gpu = context()
                    .attention_with(KERNEL, &problem, &data.inputs())
                    .unwrap();
                for (h, i) in masked_rows {
                    let row = &gpu.out[(h * 17 + i) * 32..][..32];
                    assert!(row.iter().all(|&x| x == 0.0), "head {h} row {i}: {row:?}");
                    assert_eq!(
                        gpu.lse[h * 17 + i],
                        f32::NEG_INFINITY,
                        "lse of head {h} row {i}"
                    );
                }
                assert_matches_reference(KERNEL, &problem, &data.inputs());
            }

            #[test]
            fn bottom_right_rows_without_keys_are_zero() {
                // With seq_q > seq_kv the first seq_q - seq_kv rows see no key under bottom-right alignment.
                let shape = AttentionShape::new(1, 1, 20, 5, 8);
                let problem = AttentionProblem::new(shape).with_causal(Causal::BottomRight);
                let data = crate::common::random_inputs(&problem, 3, 0.0);
                let gpu = context()
                    .attention_with(KERNEL, &problem, &data.inputs())
                    .unwrap();
                for i in 0..15 {
                    assert!(gpu.out[i * 8..][..8].iter().all(|&x| x == 0.0), "row {i}");
                    assert_eq!(gpu.lse[i], f32::NEG_INFINITY, "lse of row {i}");
                }
                assert_matches_reference(KERNEL, &problem, &data.inputs());
            }

            #[test]
            fn model_mask_minimum_float_is_finite() {
                // Models add f32::MIN (not -inf) for padding keys; the sum stays finite and exp underflows.
                let shape = AttentionShape::new(1, 1, 9, 9, 16);
                let problem = AttentionProblem::new(shape).with_mask(1, 1);
                let mut data = crate::common::random_inputs(&problem, 5, 0.0);
                let mask = data.mask.as_mut().unwrap();
                for row in mask.chunks_mut(9) {
                    row.fill(0.0);
                    row[6..].fill(f32::MIN);
                }
                // A row whose every key has f32::MIN weighs its keys equally, as does one whose
                // other keys are -inf. The log-sum-exp of such a row is about f32::MIN, so its
                // ln(sum) term is lost to rounding even in f64.
                mask[2 * 9..3 * 9].fill(f32::MIN);
                mask[5 * 9..6 * 9].fill(f32::NEG_INFINITY);
                mask[5 * 9..5 * 9 + 3].fill(f32::MIN);
                assert_matches_reference(KERNEL, &problem, &data.inputs());
            }

            #[test]
            fn explicit_scale() {
                let shape = AttentionShape::new(1, 2, 17, 33, 16);
                for (seed, scale) in [0.01, 1.0, 3.5].into_iter().enumerate() {
                    let problem = AttentionProblem::new(shape).with_scale(scale);
                    let data = crate::common::random_inputs(&problem, seed as u64, 0.0);
                    assert_matches_reference(KERNEL, &problem, &data.inputs());
                }
            }

            #[test]
            fn long_rows_and_large_batch() {
                let shape = AttentionShape::new(3, 5, 40, 2000, 64).with_kv_heads(1);
                let problem = AttentionProblem::new(shape).with_causal(Causal::BottomRight);
                let data = crate::common::random_inputs(&problem, 99, 0.0);
                assert_matches_reference(KERNEL, &problem, &data.inputs());
            }

            #[test]
            fn auto_matches_reference() {
                let shape = AttentionShape::new(2, 4, 33, 65, 48).with_kv_heads(2);
                let problem = AttentionProblem::new(shape).with_causal(Causal::TopLeft);
                let data = crate::common::random_inputs(&problem, 21, 0.0);
                assert_matches_reference(Kernel::Auto, &problem, &data.inputs());
                let out = context().attention(&problem, &data.inputs()).unwrap();
                let expected = context()
                    .attention_with(Kernel::Auto, &problem, &data.inputs())
                    .unwrap()
                    .out;
                assert_eq!(out, expected);
            }
        }
    };
}

kernel_contract!(three_stage, Kernel::ThreeStage, 256);
kernel_contract!(flash_tiled, Kernel::FlashTiled, 256);
kernel_contract!(flash_rows, Kernel::FlashRows, 128);
kernel_contract!(flash_decode, Kernel::FlashDecode, 128);
kernel_contract!(flash_subgroup, Kernel::FlashSubgroup, 128);

mod choice_and_memory {
    use crate::common::{assert_matches_reference, context};
    use wgpu_attention::validate::{ErrorStats, Tolerance};
    use wgpu_attention::{
        AttentionProblem, AttentionShape, Causal, Error, Kernel, Layout, OwnedInputs, Strides,
        TensorStrides, reference,
    };

    #[test]
    fn auto_picks_flash_for_decoding() {
        let decode =
            AttentionProblem::new(AttentionShape::new(1, 32, 1, 1024, 128).with_kv_heads(8));
        let on_cpu = context().adapter_info().device_type == wgpu::DeviceType::Cpu;
        // Kernel::Flash resolves to its decoding program on CPU adapters and its tiled one on
        // GPUs.
        let fused = if on_cpu {
            Kernel::FlashDecode
        } else {
            Kernel::FlashTiled
        };
        assert_eq!(Kernel::Auto.resolve(&decode, context()), fused);
        // For prefill the choice depends on the device: the fused kernel on CPU adapters, where
        // it measured faster, and the three-stage kernel on GPUs. On CPU adapters with
        // subgroups of 8, the fused kernel runs its subgroup program for prefill.
        let prefill = AttentionProblem::new(AttentionShape::new(1, 8, 512, 512, 64));
        let fused = if on_cpu && crate::common::has_subgroups_of_8(context()) {
            Kernel::FlashSubgroup
        } else {
            fused
        };
        let expected = if on_cpu { fused } else { Kernel::ThreeStage };
        assert_eq!(Kernel::Auto.resolve(&prefill, context()), expected);
        assert_eq!(Kernel::Flash.resolve(&prefill, context()), fused);
        let wide = AttentionProblem::new(AttentionShape::new(1, 2, 64, 64, 256));
        assert_eq!(Kernel::Flash.resolve(&wide, context()), Kernel::FlashTiled);
    }

    #[test]
    fn row_programs_reject_head_dim_over_128() {
        let problem = AttentionProblem::new(AttentionShape::new(1, 1, 4, 4, 129));
        let data = crate::common::random_inputs(&problem, 129, 0.0);
        for kernel in [
            Kernel::FlashRows,
            Kernel::FlashDecode,
            Kernel::FlashSubgroup,
        ] {
            let error = context()
                .attention_with(kernel, &problem, &data.inputs())
                .unwrap_err();
            assert!(
                matches!(error, Error::Unsupported { kernel: name, .. } if name == kernel.name()),
                "{error}"
            );
        }
        let gpu = context().attention_with(Kernel::Flash, &problem, &data.inputs());
        assert!(
            gpu.is_ok(),
            "Kernel::Flash must fall back to the tiled program"
        );
    }

    #[test]
    fn flash_splits_long_rows() {
        // 16,384 keys run as several splits of the key range merged by their log-sum-exp. On
        // llvmpipe the splits also keep each invocation under the driver's loop cap, past which
        // it would silently stop.
        let shape = AttentionShape::new(1, 2, 64, 16384, 64);
        let problem = AttentionProblem::new(shape).with_mask(1, 1);
        let data = crate::common::random_inputs(&problem, 16384, 0.1);
        let kernels = crate::common::kernels();
        for kernel in kernels.into_iter().filter(|&k| k != Kernel::ThreeStage) {
            let gpu = context()
                .attention_with(kernel, &problem, &data.inputs())
                .unwrap();
            for (h, i) in [(0, 0), (0, 31), (1, 63)] {
                let row = reference::attention_row(&problem, &data.inputs(), 0, h, i).unwrap();
                let stats = ErrorStats::compare(&gpu.out[(h * 64 + i) * 64..][..64], &row.out);
                assert!(
                    stats.passes(&Tolerance::F32),
                    "{kernel:?} head {h} row {i}: {stats}"
                );
                let lse = ErrorStats::compare(&gpu.lse[h * 64 + i..][..1], &[row.lse]);
                assert!(
                    lse.passes(&Tolerance::F32),
                    "{kernel:?} lse of head {h} row {i}: {lse}"
                );
            }
        }
    }

    #[test]
    fn tiled_splits_rows_at_large_head_dims() {
        // At head dims of 384 and more, NIR leaves the tiled program's loops over the value
        // columns rolled, so each key costs more loop iterations on llvmpipe. One split of these
        // key ranges ran past the driver's loop cap and returned wrong rows without an error.
        for (head_dim, head_dim_v, keys) in [(576, 512, 1024), (384, 384, 4096)] {
            let shape = AttentionShape::new(1, 8, 16, keys, head_dim).with_head_dim_v(head_dim_v);
            let problem = AttentionProblem::new(shape);
            let data = OwnedInputs::random(&problem, keys as u64);
            let gpu = context()
                .attention_with(Kernel::FlashTiled, &problem, &data.inputs())
                .unwrap();
            for (h, i) in [(0, 0), (3, 7), (7, 15)] {
                let row = reference::attention_row(&problem, &data.inputs(), 0, h, i).unwrap();
                let offset = (h * 16 + i) * head_dim_v;
                let stats = ErrorStats::compare(&gpu.out[offset..][..head_dim_v], &row.out);
                assert!(
                    stats.passes(&Tolerance::F32),
                    "head dim {head_dim}, {keys} keys, head {h} row {i}: {stats}"
                );
            }
        }
    }

    #[test]
    fn packed_rows_split_at_loop_cap() {
        // On CPU adapters the decoding and subgroup programs go without wgpu's bounds checks, so
        // NIR unrolls their loops over vec4 columns, and the key splits count 2 loop passes per
        // key step. Built with the checks, as packed sequences once were, the loops stay rolled
        // and one split of the long sequence ran past llvmpipe's loop cap, returning wrong rows
        // without an error. 63 one-key sequences over 2 key/value heads
        // bring the grid to 128 workgroups, the most that the split rule targets on any machine,
        // so no split for parallelism shortens the long sequence's key range.
        for (kernel, heads, seq_q, keys) in [
            (Kernel::FlashDecode, 2, 1, 8192),
            (Kernel::FlashDecode, 8, 1, 8192),
            (Kernel::FlashSubgroup, 2, 8, 4096),
        ] {
            let mut lengths = vec![(seq_q as u32, keys as u32)];
            lengths.resize(64, (1, 1));
            let (mut cu_q, mut cu_kv) = (vec![0], vec![0]);
            for &(q, kv) in &lengths {
                cu_q.push(cu_q.last().unwrap() + q);
                cu_kv.push(cu_kv.last().unwrap() + kv);
            }
            let shape = AttentionShape::new(64, heads, seq_q, keys, 128).with_kv_heads(2);
            let problem = AttentionProblem::new(shape).with_packed(seq_q + 63, keys + 63);
            let data = OwnedInputs::random(&problem, keys as u64);
            let inputs = data.inputs().with_cu_seqlens(&cu_q, &cu_kv);
            assert_matches_reference(kernel, &problem, &inputs);
        }
    }

    #[test]
    fn packed_keys_over_u32_total() {
        // K and V broadcast one key row (seq stride 0), so no binding bounds the declared total
        // of keys, which may pass u32::MAX. The programs must not cut the sequences to that
        // total taken modulo 2^32, here 0.
        let d = 8;
        let shape = AttentionShape::new(1, 1, 2, 3, d);
        let rows = Strides {
            batch: 0,
            head: 2 * d,
            seq: d,
        };
        let broadcast = Strides {
            batch: 0,
            head: d,
            seq: 0,
        };

        let problem = AttentionProblem::new(shape)
            .with_layout(Layout::Strided(TensorStrides {
                q: rows,
                k: broadcast,
                v: broadcast,
                out: rows,
            }))
            .with_packed(2, 1 << 32);
        let data = OwnedInputs::random(&problem, 3);
        let inputs = data.inputs().with_cu_seqlens(&[0, 2], &[0, 3]);

        let mut kernels = crate::common::kernels();
        kernels.push(Kernel::Auto);
        for kernel in kernels {
            crate::common::assert_matches_reference(kernel, &problem, &inputs);
        }
    }

    #[test]
    fn decode_group_block_with_splits() {
        // Grouped-query decoding: the 4 query heads of each key/value head form one block of the
        // decoding program, whose 4,096 keys are split for parallelism and merged again.
        let shape = AttentionShape::new(2, 32, 1, 4096, 128).with_kv_heads(8);
        for causal in [Causal::None, Causal::BottomRight] {
            let problem = AttentionProblem::new(shape).with_causal(causal);
            let data = crate::common::random_inputs(&problem, 4096, 0.0);
            assert_matches_reference(Kernel::FlashDecode, &problem, &data.inputs());
        }
    }

    #[test]
    fn row_programs_read_rows_of_every_width() {
        // Head dims 64, 36 and 33 read K and V 8 floats at a time (with SHADER_INT64), as vec4s
        // (an odd count of them at 36) and one element at a time. Strided layouts of head dim
        // 64 whose row stride is a multiple of 4 but not of 8 read vec4s too.
        for (head_dim, seq_q) in [(64, 3), (36, 3), (33, 3), (64, 40), (36, 40), (33, 40)] {
            let shape = AttentionShape::new(2, 4, seq_q, 77, head_dim).with_kv_heads(2);
            let problem = AttentionProblem::new(shape).with_causal(Causal::BottomRight);
            let data = crate::common::random_inputs(&problem, head_dim as u64, 0.0);
            for kernel in [Kernel::FlashDecode, Kernel::FlashSubgroup] {
                assert_matches_reference(kernel, &problem, &data.inputs());
            }
        }
        let rows = |seq: usize, row: usize| Strides {
            batch: 2 * seq * row,
            head: seq * row,
            seq: row,
        };
        let shape = AttentionShape::new(1, 2, 20, 50, 64);
        let problem = AttentionProblem::new(shape).with_layout(Layout::Strided(TensorStrides {
            q: rows(20, 68),
            k: rows(50, 68),
            v: rows(50, 68),
            out: rows(20, 64),
        }));
        let data = crate::common::random_inputs(&problem, 68, 0.0);
        for kernel in [Kernel::FlashDecode, Kernel::FlashSubgroup] {
            assert_matches_reference(kernel, &problem, &data.inputs());
        }
    }

    #[test]
    fn subgroup_program_needs_subgroups_of_8() {
        // lavapipe's Vulkan driver, the adapter of CI, runs subgroups of 8, so the subgroup
        // program is tested there. Elsewhere the call must return a typed error.
        let info = context().adapter_info();
        if info.name.contains("llvmpipe") && info.backend == wgpu::Backend::Vulkan {
            assert!(crate::common::has_subgroups_of_8(context()), "{info:?}");
        }
        if !crate::common::has_subgroups_of_8(context()) {
            let problem = AttentionProblem::new(AttentionShape::new(1, 1, 16, 16, 16));
            let data = crate::common::random_inputs(&problem, 16, 0.0);
            let error = context()
                .attention_with(Kernel::FlashSubgroup, &problem, &data.inputs())
                .unwrap_err();
            assert!(error.to_string().contains("subgroup"), "{error}");
        }
    }

    #[test]
    fn subgroup_blocks_of_four_rows() {
        // Over 8 Mi scores at head dim 64, each invocation of the subgroup program takes 4 rows,
        // a block of 32. The 3,000 packed rows of each key/value head end in a partial block,
        // and one block spans the two query heads that share a key/value head.
        let shape = AttentionShape::new(1, 4, 1500, 2900, 64).with_kv_heads(2);
        let problem = AttentionProblem::new(shape).with_causal(Causal::BottomRight);
        let data = crate::common::random_inputs(&problem, 1500, 0.0);
        let result = context().attention_with(Kernel::FlashSubgroup, &problem, &data.inputs());
        if !crate::common::has_subgroups_of_8(context()) {
            assert!(matches!(result, Err(Error::Unsupported { .. })));
            return;
        }
        let gpu = result.unwrap();
        for (h, i) in [
            (0, 0),
            (0, 31),
            (0, 1499),
            (1, 0),
            (1, 20),
            (2, 777),
            (3, 1499),
        ] {
            let row = reference::attention_row(&problem, &data.inputs(), 0, h, i).unwrap();
            let stats = ErrorStats::compare(&gpu.out[(h * 1500 + i) * 64..][..64], &row.out);
            assert!(stats.passes(&Tolerance::F32), "head {h} row {i}: {stats}");
            let lse = ErrorStats::compare(&gpu.lse[h * 1500 + i..][..1], &[row.lse]);
            assert!(
                lse.passes(&Tolerance::F32),
                "lse of head {h} row {i}: {lse}"
            );
        }
    }

    #[test]
    fn llvmpipe_rejects_three_stage_over_loop_cap() {
        // The three-stage output stage loops over every key in one invocation; on llvmpipe it
        // must return an error past the cap rather than a truncated sum. 38,000 keys ran past
        // the cap but were accepted while the count of loop passes was too low.
        let is_llvmpipe = context().adapter_info().name.contains("llvmpipe");
        for keys in [38_000, 65_536] {
            let shape = AttentionShape::new(1, 1, 4, keys, 8);
            let problem = AttentionProblem::new(shape);
            let data = crate::common::random_inputs(&problem, keys as u64, 0.0);
            let result = context().attention_with(Kernel::ThreeStage, &problem, &data.inputs());
            if is_llvmpipe {
                let error = result.unwrap_err();
                assert!(
                    matches!(
                        error,
                        Error::Unsupported {
                            kernel: "three-stage",
                            ..
                        }
                    ),
                    "{keys} keys: {error}"
                );
            } else {
                let gpu = result.unwrap();
                let row = reference::attention_row(&problem, &data.inputs(), 0, 0, 3).unwrap();
                let stats = ErrorStats::compare(&gpu.out[3 * 8..][..8], &row.out);
                assert!(stats.passes(&Tolerance::F32), "{keys} keys: {stats}");
            }
        }
        let shape = AttentionShape::new(1, 1, 4, 65536, 8);
        let problem = AttentionProblem::new(shape);
        let data = crate::common::random_inputs(&problem, 65536, 0.0);
        assert!(matches!(
            Kernel::Auto.resolve(&problem, context()),
            Kernel::FlashRows | Kernel::FlashDecode | Kernel::FlashSubgroup | Kernel::FlashTiled
        ));
        let gpu = context()
            .attention_with(Kernel::Auto, &problem, &data.inputs())
            .unwrap();
        let row = reference::attention_row(&problem, &data.inputs(), 0, 0, 3).unwrap();
        let stats = ErrorStats::compare(&gpu.out[3 * 8..][..8], &row.out);
        assert!(stats.passes(&Tolerance::F32), "auto: {stats}");
    }
}
