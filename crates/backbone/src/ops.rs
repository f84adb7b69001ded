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

impl Padding2d {
    /// The same padding of `p` pixels on all four sides, as PyTorch's `Conv2d(padding=p)`.
    pub fn uniform(p: usize) -> Self {
        Self {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }
}

/// The activation applied to a convolution's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// No activation.
    #[default]
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
}

impl Activation {
    /// [`Activation::Relu6`] when `relu6` holds, otherwise [`Activation::Identity`].
    pub fn relu6_if(relu6: bool) -> Self {
        if relu6 {
            Activation::Relu6
        } else {
            Activation::Identity
        }
    }

    /// Applies the activation to a tensor on any device.
    pub fn apply(&self, x: Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Identity => Ok(x),
            Activation::Relu => x.relu(),
            Activation::Relu6 => x.clamp(0f32, 6f32),
        }
    }

    /// Applies the activation in place to a slice.
    fn apply_slice(&self, values: &mut [f32]) {
        match self {
            Activation::Identity => {}
            Activation::Relu => {
                for v in values.iter_mut() {
                    *v = v.max(0.0);
                }
            }
            Activation::Relu6 => {
                for v in values.iter_mut() {
                    *v = v.clamp(0.0, 6.0);
                }
            }
        }
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
    Activation::relu6_if(relu6).apply(x)
}

/// A dense 2-D convolution with "same" padding, bias and optional ReLU6 (used for the stem).
///
/// `x` is (B, C_in, H, W), `weight` (C_out, C_in, k, k) and `bias` (C_out). F32 tensors on the
/// CPU use [`Conv2dGemm`]; anything else goes through [`conv2d_same_reference`].
pub fn conv2d_same(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    relu6: bool,
) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (_, _, k, _) = weight.dims4()?;
    let padding = Padding2d::same(h, w, k, stride);
    conv2d(
        x,
        weight,
        bias,
        stride,
        padding,
        Activation::relu6_if(relu6),
    )
}

/// A dense 2-D convolution with explicit zero padding, bias and an activation.
///
/// `x` is (B, C_in, H, W), `weight` (C_out, C_in, k, k) and `bias` (C_out). F32 tensors on the
/// CPU use [`Conv2dGemm`]; anything else goes through [`conv2d_reference`].
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: Padding2d,
    activation: Activation,
) -> candle_core::Result<Tensor> {
    if use_cpu_kernels(&[x, weight, bias]) {
        apply_gemm_conv(x, weight, bias, stride, padding, activation)
    } else {
        conv2d_reference(x, weight, bias, stride, padding, activation)
    }
}

/// A dense convolution with explicit padding and an activation through candle's
/// [`Tensor::conv2d`], on any device: the fallback of [`conv2d`] off the CPU.
pub fn conv2d_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: Padding2d,
    activation: Activation,
) -> candle_core::Result<Tensor> {
    let c_out = weight.dim(0)?;
    let x = x
        .pad_with_zeros(2, padding.top, padding.bottom)?
        .pad_with_zeros(3, padding.left, padding.right)?;
    let y = x.conv2d(weight, 0, stride, 1, 1)?;
    let y = y.broadcast_add(&bias.reshape((1, c_out, 1, 1))?)?;
    activation.apply(y)
}

/// A dense convolution through candle's [`Tensor::conv2d`], on any device.
///
/// This is the fallback of [`conv2d_same`] off the CPU and the reference its CPU kernel is
/// tested against.
pub fn conv2d_same_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: Padding2d,
    relu6: bool,
) -> candle_core::Result<Tensor> {
    conv2d_reference(
        x,
        weight,
        bias,
        stride,
        padding,
        Activation::relu6_if(relu6),
    )
}

/// A 1 × 1 convolution (a matrix product per image), with bias and optional ReLU6.
///
/// `x` is (B, C_in, H, W), `weight` (C_out, C_in) or (C_out, C_in, 1, 1) and `bias` (C_out).
/// F32 tensors on the CPU use [`Conv2dGemm`]; anything else goes through candle's matmul.
pub fn pointwise_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    relu6: bool,
) -> candle_core::Result<Tensor> {
    let (b, c_in, h, w) = x.dims4()?;
    let c_out = weight.dim(0)?;
    let weight = weight.reshape((c_out, c_in, 1, 1))?;
    if use_cpu_kernels(&[x, &weight, bias]) {
        return apply_gemm_conv(
            x,
            &weight,
            bias,
            1,
            Padding2d::default(),
            Activation::relu6_if(relu6),
        );
    }
    let weight = weight.reshape((c_out, c_in))?;
    let x = x.contiguous()?.reshape((b, c_in, h * w))?;
    let y = weight.broadcast_left(b)?.matmul(&x)?;
    let y = y.broadcast_add(&bias.reshape((1, c_out, 1))?)?;
    maybe_relu6(y, relu6)?.reshape((b, c_out, h, w))
}

/// Whether the CPU kernels apply: every tensor is f32 and on the CPU.
fn use_cpu_kernels(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Runs [`Conv2dGemm`] on contiguous copies of its operands.
fn apply_gemm_conv(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: Padding2d,
    activation: Activation,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &Conv2dGemm {
            stride,
            padding,
            activation,
        },
    )
}

/// `relu(a + b)` for two tensors of the same shape: the end of a residual block.
///
/// F32 tensors on the CPU use [`AddRelu`], one pass parallel over rayon's threads; anything else
/// goes through candle's own operations. The CPU kernel exists because candle's element-wise
/// operations run on a separate thread pool whose workers spin after each operation, taking
/// processor time from the convolutions that follow.
pub fn add_relu(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if use_cpu_kernels(&[a, b]) {
        a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &AddRelu)
    } else {
        (a + b)?.relu()
    }
}

/// The CPU kernel of [`add_relu`], as a candle custom op on two contiguous f32 tensors.
#[derive(Debug, Clone, Copy)]
pub struct AddRelu;

impl candle_core::CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "add-relu: shapes {:?} and {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let a = contiguous_f32(s1, l1, "first operand")?;
        let b = contiguous_f32(s2, l2, "second operand")?;
        let mut out = vec![0f32; a.len()];
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (x, y))| {
                for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                    *o = (x + y).max(0.0);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
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
    if use_cpu_kernels(&[x, weight, bias]) {
        x.contiguous()?.apply_op3_no_bwd(
            &weight.contiguous()?,
            &bias.contiguous()?,
            &DepthwiseConv2d {
                stride,
                padding,
                relu6,
                portable_only: false,
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
/// dimension. The work is split over batch × channel planes with rayon. Inside a plane each
/// kernel tap is applied to the whole range of output columns whose input column is in bounds,
/// reading a contiguous run of input (strided inputs are first split into column phases), so the
/// inner loop has no branches and vectorises.
#[derive(Debug, Clone, Copy)]
pub struct DepthwiseConv2d {
    /// The stride in both directions.
    pub stride: usize,
    /// The zero padding around the input.
    pub padding: Padding2d,
    /// Whether to apply ReLU6 to the result.
    pub relu6: bool,
    /// Run the portable kernel even where the processor has AVX-512 (both give the same values;
    /// this exists so that tests can compare them).
    pub portable_only: bool,
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
        None => candle_core::bail!("custom op: the {what} must be contiguous"),
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

        // With stride s, each input row is split into s phases (columns p, p + s, p + 2s, …),
        // so that every kernel tap reads a contiguous run of one phase and the inner loop
        // vectorises. Input column ox·s + kx − left lies in phase (kx − left) mod s, at index
        // ox + (kx − left) div s.
        let wp = w.div_ceil(s);
        // For each horizontal tap kx: the output columns [lo, hi) whose input column is in
        // [0, w), the phase, and the phase index of output column lo.
        let taps_x: Vec<(usize, usize, usize, usize)> = (0..k)
            .map(|kx| {
                let lo = pad.left.saturating_sub(kx).div_ceil(s).min(ow);
                // The largest ox with ox * s + kx <= w - 1 + left.
                let hi = match (w - 1 + pad.left).checked_sub(kx) {
                    Some(v) => (v / s + 1).min(ow),
                    None => 0,
                };
                let hi = hi.max(lo);
                let off = kx as isize - pad.left as isize;
                let phase = off.rem_euclid(s as isize) as usize;
                let start = (lo as isize + off.div_euclid(s as isize)).max(0) as usize;
                (lo, hi, phase, start)
            })
            .collect();

        let plane_in = h * w;
        let plane_out = oh * ow;
        let mut out = vec![0f32; b * c * plane_out];
        let planes = DepthwisePlanes {
            x,
            weight,
            bias,
            c,
            plane_in,
            k,
            s,
            h,
            w,
            wp,
            taps_x: &taps_x,
            oh,
            ow,
            pad,
            relu6: self.relu6,
        };
        out.par_chunks_mut(plane_out.max(1))
            .enumerate()
            .for_each(|(bc, o)| planes.plane(bc, o, self.portable_only));
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }
}

/// The operands and geometry of one depthwise convolution, shared by all its planes.
#[derive(Clone, Copy)]
struct DepthwisePlanes<'a> {
    x: &'a [f32],
    weight: &'a [f32],
    bias: &'a [f32],
    c: usize,
    plane_in: usize,
    k: usize,
    s: usize,
    h: usize,
    w: usize,
    wp: usize,
    taps_x: &'a [(usize, usize, usize, usize)],
    oh: usize,
    ow: usize,
    pad: Padding2d,
    relu6: bool,
}

impl DepthwisePlanes<'_> {
    /// Computes output plane `bc` (image-major, then channel) into `o`, choosing at run time a copy
    /// compiled with AVX-512 where the processor has it. Only the vector width differs between the
    /// two: the compiler never reorders or fuses floating-point operations, so they give the same
    /// bits.
    fn plane(&self, bc: usize, o: &mut [f32], portable_only: bool) {
        #[cfg(target_arch = "x86_64")]
        {
            if !portable_only && std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the processor supports AVX-512F, checked just above.
                return unsafe { self.plane_avx512(bc, o) };
            }
        }
        self.plane_portable(bc, o)
    }

    /// The AVX-512 body of [`Self::plane`].
    ///
    /// The plane is copied once into a zero-padded buffer split into `s` column phases (phase `p`
    /// holds padded columns `p, p + s, p + 2s, …`), so that for every tap the inputs of
    /// consecutive output columns are consecutive in memory. Output rows are cut into chunks of
    /// [`LANES`] columns, and [`GROUP`] chunks are summed at once in registers: each starts at the
    /// bias and adds `weight × input` tap by tap, row-major over the kernel, with a separate
    /// multiply and add exactly as [`Self::plane_portable`] does. Taps on the padding add
    /// `weight × 0`, which leaves a sum unchanged, so both give the same values.
    ///
    /// # Safety
    ///
    /// The processor must support AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn plane_avx512(&self, bc: usize, o: &mut [f32]) {
        use std::arch::x86_64::*;
        let DepthwisePlanes {
            x,
            weight,
            bias,
            c,
            plane_in,
            k,
            s,
            h,
            w,
            oh,
            ow,
            pad,
            relu6,
            ..
        } = *self;
        let ch = bc % c;
        let input = &x[bc * plane_in..(bc + 1) * plane_in];
        let kernel = &weight[ch * k * k..(ch + 1) * k * k];
        // The padded plane is (top + h + bottom) × (left + w + right); every phase row has room
        // for a chunk that starts at its last output column to read LANES values.
        let padded_h = pad.top + h + pad.bottom;
        let padded_w = pad.left + w + pad.right;
        let row_len = padded_w.div_ceil(s) + LANES;
        let mut phases = vec![0f32; s * padded_h * row_len];
        // Stride 2 deinterleaves each padded row with two permutes per 32 values; `row` is one
        // padded row with room for the last group of 32.
        let mut row = if s == 2 {
            vec![0f32; padded_w.next_multiple_of(32)]
        } else {
            Vec::new()
        };
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        for (iy, src) in input.chunks_exact(w).enumerate() {
            let y = iy + pad.top;
            if s == 1 {
                phases[y * row_len + pad.left..][..w].copy_from_slice(src);
                continue;
            }
            if s == 2 {
                row[pad.left..pad.left + w].copy_from_slice(src);
                let (p0, p1) = (y * row_len, (padded_h + y) * row_len);
                for (g, pair) in row.chunks_exact(32).enumerate() {
                    // The last group may write up to 16 values past the row's padded width,
                    // into the LANES spare values of each phase row.
                    assert!(p1 + 16 * g + 16 <= phases.len() && p0 + 16 * g + 16 <= p1);
                    // SAFETY: AVX-512F is enabled here; `pair` holds 32 values and both
                    // destinations hold 16 (checked just above).
                    unsafe {
                        let a = _mm512_loadu_ps(pair.as_ptr());
                        let b = _mm512_loadu_ps(pair.as_ptr().add(16));
                        let out = phases.as_mut_ptr();
                        _mm512_storeu_ps(out.add(p0 + 16 * g), _mm512_permutex2var_ps(a, even, b));
                        _mm512_storeu_ps(out.add(p1 + 16 * g), _mm512_permutex2var_ps(a, odd, b));
                    }
                }
                continue;
            }
            // Padded column xp = ix + left lies in phase xp mod s at index xp div s.
            for phase in 0..s {
                let first = (phase + s - pad.left % s) % s;
                if first >= w {
                    continue;
                }
                let dst = &mut phases[(phase * padded_h + y) * row_len + (first + pad.left) / s..];
                for (d, &v) in dst.iter_mut().zip(src[first..].iter().step_by(s)) {
                    *d = v;
                }
            }
        }
        // Tap (ky, kx) of the chunk at output (oy, ox0) reads LANES values from
        // chunk base (oy·s·row_len + ox0) + tap offset.
        let taps: Vec<usize> = (0..k * k)
            .map(|t| {
                let (ky, kx) = (t / k, t % k);
                ((kx % s) * padded_h + ky) * row_len + kx / s
            })
            .collect();
        let last_tap = taps.iter().copied().max().unwrap_or(0);
        let per_row = ow.div_ceil(LANES);
        let chunks = oh * per_row;
        let place = |i: usize| {
            let (oy, ox0) = (i / per_row, (i % per_row) * LANES);
            (oy * ow + ox0, LANES.min(ow - ox0), oy * s * row_len + ox0)
        };
        let store = |acc: __m512, (dst, n, _): (usize, usize, usize), o: &mut [f32]| {
            let v = if relu6 {
                _mm512_min_ps(_mm512_max_ps(acc, _mm512_setzero_ps()), _mm512_set1_ps(6.0))
            } else {
                acc
            };
            let out = &mut o[dst..dst + n];
            let mask: __mmask16 = ((1u32 << n) - 1) as __mmask16;
            // SAFETY: the mask covers `n` lanes and `out` holds `n` values.
            unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr(), mask, v) };
        };
        let mut i = 0;
        while i < chunks {
            if chunks - i >= GROUP {
                let places: [(usize, usize, usize); GROUP] = std::array::from_fn(|j| place(i + j));
                let bases = places.map(|p| p.2);
                assert!(bases[GROUP - 1] + last_tap + LANES <= phases.len());
                // SAFETY: AVX-512F is enabled here; every base plus every tap offset plus LANES
                // stays within `phases` (the largest base is the last, checked just above).
                let acc = unsafe { sum_taps::<GROUP>(&phases, bases, &taps, kernel, bias[ch]) };
                for (a, p) in acc.into_iter().zip(places) {
                    store(a, p, o);
                }
                i += GROUP;
            } else {
                let p = place(i);
                assert!(p.2 + last_tap + LANES <= phases.len());
                // SAFETY: as above, for the one base.
                let [a] = unsafe { sum_taps::<1>(&phases, [p.2], &taps, kernel, bias[ch]) };
                store(a, p, o);
                i += 1;
            }
        }
    }

    #[inline(always)]
    fn plane_portable(&self, bc: usize, o: &mut [f32]) {
        let DepthwisePlanes {
            x,
            weight,
            bias,
            c,
            plane_in,
            k,
            s,
            h,
            w,
            wp,
            taps_x,
            oh,
            ow,
            pad,
            relu6,
        } = *self;
        let ch = bc % c;
        let input = &x[bc * plane_in..(bc + 1) * plane_in];
        let kernel = &weight[ch * k * k..(ch + 1) * k * k];
        let split;
        let (phases, row_len): (&[f32], usize) = if s == 1 {
            (input, w)
        } else {
            let mut buf = vec![0f32; s * h * wp];
            for (iy, row) in input.chunks_exact(w).enumerate() {
                for phase in 0..s.min(w) {
                    let dst = &mut buf[(phase * h + iy) * wp..][..wp];
                    for (d, &v) in dst.iter_mut().zip(row[phase..].iter().step_by(s)) {
                        *d = v;
                    }
                }
            }
            split = buf;
            (&split, wp)
        };
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
                for (kx, &(lo, hi, phase, start)) in taps_x.iter().enumerate() {
                    if lo >= hi {
                        continue;
                    }
                    let wv = kernel[ky * k + kx];
                    let row = &phases[(phase * h + iy) * row_len..][..row_len];
                    let src = &row[start..start + (hi - lo)];
                    for (d, &v) in orow[lo..hi].iter_mut().zip(src) {
                        *d += wv * v;
                    }
                }
            }
        }
        if relu6 {
            for v in o.iter_mut() {
                *v = v.clamp(0.0, 6.0);
            }
        }
    }
}

/// Sums `G` chunks of [`LANES`] depthwise outputs: `bias + Σ_t kernel[t] × phases[base + taps[t] ..]`,
/// tap by tap in order, with a separate multiply and add.
///
/// # Safety
///
/// AVX-512F must be available, and `base + taps[t] + LANES <= phases.len()` for every base and tap.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn sum_taps<const G: usize>(
    phases: &[f32],
    bases: [usize; G],
    taps: &[usize],
    kernel: &[f32],
    bias: f32,
) -> [std::arch::x86_64::__m512; G] {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(bias); G];
    let p = phases.as_ptr();
    for (&off, &wv) in taps.iter().zip(kernel) {
        let wv = _mm512_set1_ps(wv);
        for j in 0..G {
            // SAFETY: the caller guarantees that LANES values from base + off are in `phases`.
            let v = unsafe { _mm512_loadu_ps(p.add(bases[j] + off)) };
            acc[j] = _mm512_add_ps(acc[j], _mm512_mul_ps(wv, v));
        }
    }
    acc
}

/// Output columns per chunk of the AVX-512 depthwise kernel: one 512-bit vector of f32.
#[cfg(target_arch = "x86_64")]
const LANES: usize = 16;

/// Chunks the AVX-512 depthwise kernel sums at once, so that this many independent sums are in
/// flight per tap.
#[cfg(target_arch = "x86_64")]
const GROUP: usize = 8;

/// The CPU dense convolution kernel, as a candle custom op on (input, weight, bias).
///
/// Shapes: input (B, C_in, H, W), weight (C_out, C_in, k, k), bias (C_out), all f32; output
/// (B, C_out, OH, OW). Each image is one matrix product `W · cols`, where `cols` is the input
/// itself for a 1 × 1 convolution without stride or padding and an im2col matrix
/// (C_in·k·k × OH·OW) otherwise. The product accumulates into an output pre-filled with the bias
/// and the activation is applied in place, so bias and activation cost no extra pass over memory.
#[derive(Debug, Clone, Copy)]
pub struct Conv2dGemm {
    /// The stride in both directions.
    pub stride: usize,
    /// The zero padding around the input.
    pub padding: Padding2d,
    /// The activation applied to the result.
    pub activation: Activation,
}

impl CustomOp3 for Conv2dGemm {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
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
        let (b, c_in, h, w) = l1.shape().dims4()?;
        let (c_out, wc_in, k, k2) = l2.shape().dims4()?;
        if wc_in != c_in || k != k2 || l3.shape().dims() != [c_out] {
            candle_core::bail!(
                "conv2d: input {:?}, weight {:?} and bias {:?} do not fit",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        if self.stride == 0 || k == 0 {
            candle_core::bail!("conv2d: stride and kernel size must be positive");
        }
        let pad = self.padding;
        if h + pad.top + pad.bottom < k || w + pad.left + pad.right < k {
            candle_core::bail!("conv2d: the padded input is smaller than the kernel");
        }
        let x = contiguous_f32(s1, l1, "input")?;
        let weight = contiguous_f32(s2, l2, "weight")?;
        let bias = contiguous_f32(s3, l3, "bias")?;
        let (oh, ow) = pad.output_size(h, w, k, self.stride);
        let n = oh * ow;
        let depth = c_in * k * k;
        let direct = k == 1 && self.stride == 1 && pad == Padding2d::default();
        let mut out = vec![0f32; b * c_out * n];
        if n == 0 || c_out == 0 {
            return Ok((CpuStorage::F32(out), Shape::from((b, c_out, oh, ow))));
        }
        let threads = rayon::current_num_threads();
        // Parallel over images when there are enough of them, otherwise inside each product.
        let per_image_parallel = b < threads;
        let run = |(i, dst): (usize, &mut [f32])| {
            let input = &x[i * c_in * h * w..(i + 1) * c_in * h * w];
            let cols_owned;
            let cols: &[f32] = if direct {
                input
            } else {
                cols_owned = im2col(
                    input,
                    c_in,
                    h,
                    w,
                    k,
                    self.stride,
                    pad,
                    oh,
                    ow,
                    per_image_parallel,
                );
                &cols_owned
            };
            if per_image_parallel {
                dst.par_chunks_mut(n)
                    .zip(bias)
                    .for_each(|(row, &bv)| row.fill(bv));
            } else {
                for (row, &bv) in dst.chunks_mut(n).zip(bias) {
                    row.fill(bv);
                }
            }
            let parallelism = if per_image_parallel {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: `dst` holds c_out × n floats, `weight` c_out × depth and `cols` depth × n,
            // all row-major with the strides given here, so every access gemm makes is in bounds;
            // `dst` is exclusively borrowed and does not alias the two read-only operands.
            unsafe {
                gemm::gemm(
                    c_out,
                    n,
                    depth,
                    dst.as_mut_ptr(),
                    1,
                    n as isize,
                    true,
                    weight.as_ptr(),
                    1,
                    depth as isize,
                    cols.as_ptr(),
                    1,
                    n as isize,
                    1.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
            if self.activation != Activation::Identity {
                let act = |row: &mut [f32]| self.activation.apply_slice(row);
                if per_image_parallel {
                    dst.par_chunks_mut(n).for_each(act);
                } else {
                    act(dst);
                }
            }
        };
        if per_image_parallel {
            out.chunks_mut(c_out * n).enumerate().for_each(run);
        } else {
            out.par_chunks_mut(c_out * n).enumerate().for_each(run);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, c_out, oh, ow))))
    }
}

/// Unfolds one image (C, H, W) into a (C·k·k) × (OH·OW) row-major matrix for a convolution.
#[allow(clippy::too_many_arguments)]
fn im2col(
    input: &[f32],
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: Padding2d,
    oh: usize,
    ow: usize,
    parallel: bool,
) -> Vec<f32> {
    let n = oh * ow;
    let mut cols = vec![0f32; c * k * k * n];
    // Row (ci, ky, kx) of the matrix holds input[ci, oy·s + ky − top, ox·s + kx − left].
    let fill = |(r, row): (usize, &mut [f32])| {
        let ci = r / (k * k);
        let ky = (r / k) % k;
        let kx = r % k;
        let plane = &input[ci * h * w..(ci + 1) * h * w];
        for oy in 0..oh {
            let Some(iy) = (oy * stride + ky).checked_sub(pad.top) else {
                continue;
            };
            if iy >= h {
                continue;
            }
            let dst = &mut row[oy * ow..(oy + 1) * ow];
            let src = &plane[iy * w..(iy + 1) * w];
            for (ox, d) in dst.iter_mut().enumerate() {
                if let Some(ix) = (ox * stride + kx).checked_sub(pad.left) {
                    if ix < w {
                        *d = src[ix];
                    }
                }
            }
        }
    };
    if parallel {
        cols.par_chunks_mut(n).enumerate().for_each(fill);
    } else {
        cols.chunks_mut(n).enumerate().for_each(fill);
    }
    cols
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
