//! Convolution kernels with TensorFlow-style "same" padding, and a fast CPU depthwise convolution.
//!
//! Every function here takes a weight with batch norm already folded in, a bias, and a flag that
//! applies ReLU6 (`min(max(x, 0), 6)`) to the result, so that a whole conv + BN + activation unit
//! is one call.
//!
//! Candle implements grouped convolution by splitting the input into one convolution per group,
//! which for a depthwise convolution (as many groups as channels) is very slow on the CPU.
//! [`depthwise_conv2d`] therefore runs a dedicated kernel ([`DepthwiseConv2d`], a candle
//! [`CustomOp3`]) on CPU tensors, parallel over batch × channel with rayon, and falls back to
//! candle's grouped convolution ([`depthwise_conv2d_reference`]) on other devices.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Zero padding on the four sides of an image, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Padding2d {
    /// Rows added above.
    pub top: usize,
    /// Rows added below.
    pub bottom: usize,
    /// Columns added on the left.
    pub left: usize,
    /// Columns added on the right.
    pub right: usize,
}

impl Padding2d {
    /// TensorFlow's "same" padding for a square kernel and stride on an `h` × `w` input.
    ///
    /// The output has `ceil(h / stride)` × `ceil(w / stride)` pixels; the total padding of a
    /// dimension of size `n` is `max((ceil(n / s) - 1) * s + k - n, 0)`, of which the smaller half
    /// goes before and the larger half after, as in `Conv2dStaticSamePadding` of the reference.
    pub fn same(h: usize, w: usize, kernel: usize, stride: usize) -> Self {
        let (top, bottom) = same_1d(h, kernel, stride);
        let (left, right) = same_1d(w, kernel, stride);
        Self {
            top,
            bottom,
            left,
            right,
        }
    }

    /// The output size of a convolution with this padding.
    pub fn output_size(&self, h: usize, w: usize, kernel: usize, stride: usize) -> (usize, usize) {
        let oh = (h + self.top + self.bottom).saturating_sub(kernel) / stride + 1;
        let ow = (w + self.left + self.right).saturating_sub(kernel) / stride + 1;
        (oh, ow)
    }
}

/// The "same" padding (before, after) of one dimension.
fn same_1d(n: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = n.div_ceil(stride);
    let total = ((out.max(1) - 1) * stride + kernel).saturating_sub(n);
    (total / 2, total - total / 2)
}

/// Applies ReLU6 when asked.
fn maybe_relu6(x: Tensor, relu6: bool) -> candle_core::Result<Tensor> {
    if relu6 {
        x.clamp(0f32, 6f32)
    } else {
        Ok(x)
    }
}

/// A dense 2-D convolution with "same" padding, bias and optional ReLU6 (used for the stem).
///
/// `x` is (B, C_in, H, W), `weight` (C_out, C_in, k, k) and `bias` (C_out).
pub fn conv2d_same(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    relu6: bool,
) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (c_out, _, k, _) = weight.dims4()?;
    let pad = Padding2d::same(h, w, k, stride);
    let x = x
        .pad_with_zeros(2, pad.top, pad.bottom)?
        .pad_with_zeros(3, pad.left, pad.right)?;
    let y = x.conv2d(weight, 0, stride, 1, 1)?;
    let y = y.broadcast_add(&bias.reshape((1, c_out, 1, 1))?)?;
    maybe_relu6(y, relu6)
}

/// A 1 × 1 convolution as a matrix product, with bias and optional ReLU6.
///
/// `x` is (B, C_in, H, W), `weight` (C_out, C_in) or (C_out, C_in, 1, 1) and `bias` (C_out).
pub fn pointwise_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    relu6: bool,
) -> candle_core::Result<Tensor> {
    let (b, c_in, h, w) = x.dims4()?;
    let c_out = weight.dim(0)?;
    let weight = weight.reshape((c_out, c_in))?;
    let x = x.contiguous()?.reshape((b, c_in, h * w))?;
    let y = if b == 1 {
        weight.matmul(&x.squeeze(0)?)?.unsqueeze(0)?
    } else {
        weight.broadcast_left(b)?.matmul(&x)?
    };
    let y = y.broadcast_add(&bias.reshape((1, c_out, 1))?)?;
    maybe_relu6(y, relu6)?.reshape((b, c_out, h, w))
}

/// A depthwise convolution with "same" padding, bias and optional ReLU6.
///
/// `x` is (B, C, H, W), `weight` (C, 1, k, k) and `bias` (C). F32 tensors on the CPU use the
/// dedicated [`DepthwiseConv2d`] kernel; anything else goes through
/// [`depthwise_conv2d_reference`].
pub fn depthwise_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    relu6: bool,
) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (_, _, k, _) = weight.dims4()?;
    let padding = Padding2d::same(h, w, k, stride);
    let all_f32 = [x, weight, bias].iter().all(|t| t.dtype() == DType::F32);
    if x.device().is_cpu() && all_f32 {
        x.apply_op3_no_bwd(
            weight,
            bias,
            &DepthwiseConv2d {
                stride,
                padding,
                relu6,
            },
        )
    } else {
        depthwise_conv2d_reference(x, weight, bias, stride, padding, relu6)
    }
}

/// A depthwise convolution through candle's grouped [`Tensor::conv2d`], on any device.
///
/// This is the fallback of [`depthwise_conv2d`] off the CPU and the reference its CPU kernel is
/// tested against.
pub fn depthwise_conv2d_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: Padding2d,
    relu6: bool,
) -> candle_core::Result<Tensor> {
    let c = x.dim(1)?;
    let x = x
        .pad_with_zeros(2, padding.top, padding.bottom)?
        .pad_with_zeros(3, padding.left, padding.right)?;
    let y = x.conv2d(weight, 0, stride, 1, c)?;
    let y = y.broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
    maybe_relu6(y, relu6)
}

/// The CPU depthwise convolution kernel, as a candle custom op on (input, weight, bias).
///
/// Shapes: input (B, C, H, W), weight (C, 1, k, k), bias (C), all f32; output (B, C, OH, OW) with
/// the size given by [`Padding2d::output_size`]. Padding may differ between the two sides of a
/// dimension. The work is split over batch × channel planes with rayon; inside a plane each
/// kernel tap is applied to the whole range of output columns whose input column is in bounds, so
/// the inner loop has no branches.
#[derive(Debug, Clone, Copy)]
pub struct DepthwiseConv2d {
    /// The stride in both directions.
    pub stride: usize,
    /// The zero padding around the input.
    pub padding: Padding2d,
    /// Whether to apply ReLU6 to the result.
    pub relu6: bool,
}

/// The contiguous f32 data of a CPU tensor, or an error naming `what`.
fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("depthwise conv: the {what} must be contiguous"),
    }
}

impl CustomOp3 for DepthwiseConv2d {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l1.shape().dims4()?;
        let (wc, one, k, k2) = l2.shape().dims4()?;
        if wc != c || one != 1 || k != k2 || l3.shape().dims() != [c] {
            candle_core::bail!(
                "depthwise conv: input {:?}, weight {:?} and bias {:?} do not fit",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        if self.stride == 0 || k == 0 {
            candle_core::bail!("depthwise conv: stride and kernel size must be positive");
        }
        let x = contiguous_f32(s1, l1, "input")?;
        let weight = contiguous_f32(s2, l2, "weight")?;
        let bias = contiguous_f32(s3, l3, "bias")?;
        let pad = self.padding;
        if h + pad.top + pad.bottom < k || w + pad.left + pad.right < k {
            candle_core::bail!("depthwise conv: the padded input is smaller than the kernel");
        }
        let (oh, ow) = pad.output_size(h, w, k, self.stride);
        let s = self.stride;

        // For each horizontal tap kx, the output columns whose input column
        // ox * s + kx - left lies in [0, w).
        let col_ranges: Vec<(usize, usize)> = (0..k)
            .map(|kx| {
                let lo = pad.left.saturating_sub(kx).div_ceil(s).min(ow);
                // The largest ox with ox * s + kx <= w - 1 + left.
                let hi = match (w - 1 + pad.left).checked_sub(kx) {
                    Some(v) => (v / s + 1).min(ow),
                    None => 0,
                };
                (lo, hi.max(lo))
            })
            .collect();

        let plane_in = h * w;
        let plane_out = oh * ow;
        let mut out = vec![0f32; b * c * plane_out];
        out.par_chunks_mut(plane_out.max(1))
            .enumerate()
            .for_each(|(bc, o)| {
                let ch = bc % c;
                let input = &x[bc * plane_in..(bc + 1) * plane_in];
                let kernel = &weight[ch * k * k..(ch + 1) * k * k];
                o.fill(bias[ch]);
                for oy in 0..oh {
                    let orow = &mut o[oy * ow..(oy + 1) * ow];
                    for ky in 0..k {
                        // The input row is oy * s + ky - top; skip rows in the padding.
                        let Some(iy) = (oy * s + ky).checked_sub(pad.top) else {
                            continue;
                        };
                        if iy >= h {
                            continue;
                        }
                        let irow = &input[iy * w..(iy + 1) * w];
                        for (kx, &(lo, hi)) in col_ranges.iter().enumerate() {
                            if lo >= hi {
                                continue;
                            }
                            let wv = kernel[ky * k + kx];
                            // The first input column is lo * s + kx - left, never negative here.
                            let first = lo * s + kx - pad.left;
                            let dst = &mut orow[lo..hi];
                            if s == 1 {
                                let src = &irow[first..first + (hi - lo)];
                                for (d, &v) in dst.iter_mut().zip(src) {
                                    *d += wv * v;
                                }
                            } else {
                                let src = irow[first..].iter().step_by(s);
                                for (d, &v) in dst.iter_mut().zip(src) {
                                    *d += wv * v;
                                }
                            }
                        }
                    }
                }
                if self.relu6 {
                    for v in o.iter_mut() {
                        *v = v.clamp(0.0, 6.0);
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_matches_the_reference_formula() {
        // Stride 2 with a 3x3 kernel on 224 pads (0, 1), as Conv2dStaticSamePadding does.
        assert_eq!(same_1d(224, 3, 2), (0, 1));
        // Stride 2 with a 5x5 kernel on 56 pads (1, 2).
        assert_eq!(same_1d(56, 5, 2), (1, 2));
        // Stride 1 pads k - 1 symmetrically.
        assert_eq!(same_1d(28, 5, 1), (2, 2));
        assert_eq!(same_1d(28, 1, 1), (0, 0));
        // Odd sizes with stride 2.
        assert_eq!(same_1d(15, 3, 2), (1, 1));
        let p = Padding2d::same(224, 224, 3, 2);
        assert_eq!(p.output_size(224, 224, 3, 2), (112, 112));
        let p = Padding2d::same(15, 9, 5, 2);
        assert_eq!(p.output_size(15, 9, 5, 2), (8, 5));
    }
}
