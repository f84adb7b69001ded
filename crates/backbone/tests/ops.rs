//! The CPU depthwise kernel and the pointwise convolution against candle's own convolutions.

use candle_core::{DType, Device, Tensor};
use patchcore_backbone::ops::{
    depthwise_conv2d, depthwise_conv2d_reference, pointwise_conv2d, DepthwiseConv2d, Padding2d,
};
use proptest::prelude::*;

fn seq(shape: &[usize], seed: u32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2001) as f32 / 250.0 - 4.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Arbitrary shapes, strides, kernel sizes and (asymmetric) paddings.
    #[test]
    fn depthwise_kernel_matches_grouped_conv(
        b in 1usize..3, c in 1usize..6, h in 1usize..13, w in prop_oneof![1usize..13, 13usize..70],
        k in prop::sample::select(vec![1usize, 3, 5]), stride in 1usize..4,
        pads in (0usize..3, 0usize..3, 0usize..3, 0usize..3),
        relu6 in any::<bool>(), seed in any::<u32>(),
    ) {
        let padding = Padding2d { top: pads.0, bottom: pads.1, left: pads.2, right: pads.3 };
        prop_assume!(h + pads.0 + pads.1 >= k && w + pads.2 + pads.3 >= k);
        let x = seq(&[b, c, h, w], seed);
        let wt = seq(&[c, 1, k, k], seed ^ 1);
        let bias = seq(&[c], seed ^ 2);
        let op = DepthwiseConv2d { stride, padding, relu6, portable_only: false };
        let ours = x.apply_op3_no_bwd(&wt, &bias, &op).unwrap();
        let reference = depthwise_conv2d_reference(&x, &wt, &bias, stride, padding, relu6).unwrap();
        prop_assert!(max_abs_diff(&ours, &reference) < 1e-4);
        // The vectorised kernel (AVX-512 where the processor has it) and the portable one sum
        // the same products in the same order: the values are equal, not merely close.
        let portable = DepthwiseConv2d { portable_only: true, ..op };
        let portable = x.apply_op3_no_bwd(&wt, &bias, &portable).unwrap();
        let (a, b) = (flat(&ours), flat(&portable));
        prop_assert_eq!(a.len(), b.len());
        for (i, (u, v)) in a.iter().zip(&b).enumerate() {
            prop_assert!(u == v, "element {}: {} against {}", i, u, v);
        }
    }
}

#[test]
fn depthwise_same_padding_at_network_shapes() {
    for (h, k, s) in [(112, 3, 1), (112, 3, 2), (56, 5, 2), (28, 5, 1), (15, 5, 2)] {
        let x = seq(&[2, 8, h, h + 3], 7);
        let wt = seq(&[8, 1, k, k], 8);
        let bias = seq(&[8], 9);
        let ours = depthwise_conv2d(&x, &wt, &bias, s, true).unwrap();
        let pad = Padding2d::same(h, h + 3, k, s);
        let reference = depthwise_conv2d_reference(&x, &wt, &bias, s, pad, true).unwrap();
        assert_eq!(ours.dims(), &[2, 8, h.div_ceil(s), (h + 3).div_ceil(s)]);
        assert!(max_abs_diff(&ours, &reference) < 1e-4);
    }
}

#[test]
fn depthwise_accepts_non_contiguous_input_and_rejects_bad_shapes() {
    // A transposed (non-contiguous) input is made contiguous by the public wrapper.
    let x = seq(&[1, 4, 9, 7], 3).transpose(2, 3).unwrap();
    let wt = seq(&[4, 1, 3, 3], 4);
    let bias = seq(&[4], 5);
    let reference = depthwise_conv2d_reference(
        &x.contiguous().unwrap(),
        &wt,
        &bias,
        1,
        Padding2d::same(7, 9, 3, 1),
        false,
    )
    .unwrap();
    let ours = depthwise_conv2d(&x.contiguous().unwrap(), &wt, &bias, 1, false).unwrap();
    assert!(max_abs_diff(&ours, &reference) < 1e-4);
    let t = depthwise_conv2d(&x, &wt, &bias, 1, false).unwrap();
    assert!(max_abs_diff(&t, &reference) < 1e-4);
    // The raw custom op reports non-contiguous input as an error instead of misreading it.
    let op = DepthwiseConv2d {
        stride: 1,
        padding: Padding2d::same(7, 9, 3, 1),
        relu6: false,
        portable_only: false,
    };
    assert!(x.apply_op3_no_bwd(&wt, &bias, &op).is_err());
    // Mismatched channels.
    let bad = seq(&[3, 1, 3, 3], 6);
    assert!(depthwise_conv2d(&x.contiguous().unwrap(), &bad, &bias, 1, false).is_err());
}

#[test]
fn pointwise_matches_conv2d() {
    for b in [1, 2, 3, 8] {
        let x = seq(&[b, 6, 5, 7], 11);
        let wt = seq(&[9, 6, 1, 1], 12);
        let bias = seq(&[9], 13);
        let ours = pointwise_conv2d(&x, &wt.reshape((9, 6)).unwrap(), &bias, true).unwrap();
        let reference = x
            .conv2d(&wt, 0, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, 9, 1, 1)).unwrap())
            .unwrap()
            .clamp(0f32, 6f32)
            .unwrap();
        assert_eq!(ours.dtype(), DType::F32);
        assert!(max_abs_diff(&ours, &reference) < 1e-4);
    }
}

#[test]
fn dense_gemm_kernel_matches_candle_conv() {
    use patchcore_backbone::ops::{conv2d_same, conv2d_same_reference};
    for (b, c_in, c_out, h, w, k, s) in [
        (1, 3, 32, 224, 224, 3, 2),
        (3, 3, 8, 17, 10, 3, 2),
        (2, 4, 5, 9, 9, 5, 1),
        (1, 2, 3, 1, 1, 3, 2),
        (2, 5, 7, 6, 4, 1, 2),
    ] {
        let x = seq(&[b, c_in, h, w], 21);
        let wt = seq(&[c_out, c_in, k, k], 22);
        let bias = seq(&[c_out], 23);
        for relu6 in [false, true] {
            let ours = conv2d_same(&x, &wt, &bias, s, relu6).unwrap();
            let pad = Padding2d::same(h, w, k, s);
            let reference = conv2d_same_reference(&x, &wt, &bias, s, pad, relu6).unwrap();
            assert_eq!(ours.dims(), &[b, c_out, h.div_ceil(s), w.div_ceil(s)]);
            let scale = reference
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            let scale = scale.to_scalar::<f32>().unwrap().max(1.0);
            assert!(max_abs_diff(&ours, &reference) / scale < 1e-5);
        }
    }
}

#[test]
fn add_relu_equals_candles_add_then_relu() {
    use patchcore_backbone::ops::add_relu;
    let a = Tensor::randn(0f32, 1f32, (2, 5, 7, 9), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 1f32, (2, 5, 7, 9), &Device::Cpu).unwrap();
    let ours = add_relu(&a, &b).unwrap();
    let reference = (&a + &b).unwrap().relu().unwrap();
    let diff = (ours - reference)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    let c = Tensor::zeros((2, 5, 7, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(add_relu(&a, &c).is_err());
}
