//! The fused AVX-512 shortlist kernel: packed dot products of queries with bank rows, turned into
//! GEMM distances and filtered against each query's shortlist threshold in registers, so that the
//! `queries × bank` distance matrix is never written to memory.
//!
//! # Layout
//!
//! * The bank (centred on its mean) is packed once, when the index is built, into *panels* of
//!   [`NR`] rows: panel `p` holds rows `NR·p .. NR·p + NR` as `dim` consecutive groups of `NR`
//!   values, element `k` of every row of the panel side by side (`panel[k·NR + j] = row_j[k]`).
//!   Rows past the end of the bank are zero, and their squared norms are NaN, so their GEMM
//!   distance is NaN and never passes a `≤` comparison.
//! * A block of queries is packed the same way into panels of [`MR`] queries
//!   (`panel[k·MR + i] = query_i[k]`), zero-padded.
//! * The `f32` micro-kernel ([`F32`]) multiplies one query panel by one bank panel: `MR × NR`
//!   dot products of length `dim`, accumulated in 28 registers with one fused multiply-add per
//!   element and summed in order `k = 0, 1, …` per dot product. The error bound of the shortlist (see the
//!   `exact` module) holds for any summation order, with or without fused multiply-adds.
//!
//! * The bfloat16 variant ([`Bf16`]) packs the same panels with one 32-bit element per pair of
//!   dimensions (`2·kp` in the low half, `2·kp + 1` in the high half, rounded to nearest even by
//!   [`to_bf16`]) and multiplies them with `vdpbf16ps`: two exact products per lane and step,
//!   added to the same `f32` accumulators, at twice the rate of the `f32` FMAs. Its wider error
//!   bound is accounted for by the `exact` module's band.
//!
//! The kernel is only used when the CPU reports AVX-512F at run time, and its bfloat16 variant
//! only with AVX512-BF16 as well: without AVX512-BF16 the index uses the `f32` kernel, without
//! AVX-512F the portable `gemm` crate path. All give bit-identical search results because the
//! shortlist is followed by exact rescoring.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::exact::Shortlist;

/// Queries per micro-kernel panel.
pub(crate) const MR: usize = 14;
/// Bank rows per micro-kernel panel (two 16-lane vectors).
pub(crate) const NR: usize = 32;

/// Whether this CPU can run the AVX-512 kernel.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Packs `rows` (row-major, `dim` columns) into panels of `width` rows, zero-padded at the end.
pub(crate) fn pack(rows: &[f32], dim: usize, width: usize) -> Vec<f32> {
    let mut packed = vec![0f32; (rows.len() / dim).div_ceil(width) * width * dim];
    pack_into(&mut packed, rows, dim, width);
    packed
}

/// Writes `rows` (row-major, `dim` columns) into `packed`, panels of `width` rows laid out as
/// described in the module documentation. `packed` must hold whole panels for every row and
/// zeros where no row lands.
pub(crate) fn pack_into(packed: &mut [f32], rows: &[f32], dim: usize, width: usize) {
    for (r, row) in rows.chunks_exact(dim).enumerate() {
        let panel = &mut packed[(r / width) * width * dim..][..width * dim];
        let lane = r % width;
        for (k, &v) in row.iter().enumerate() {
            panel[k * width + lane] = v;
        }
    }
}

/// The packed, centred bank: panels of [`NR`] rows and one squared norm per packed row.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Panels<'a, T> {
    /// `NR × steps` elements per panel, laid out as described in the module documentation.
    pub(crate) values: &'a [T],
    /// The squared norm of every packed row; NaN for the padding rows.
    pub(crate) norms: &'a [f32],
}

/// Whether this CPU can run the bf16 variant of the kernel (AVX-512F and AVX512-BF16).
pub(crate) fn available_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rounds `x` to the nearest bfloat16 (ties to even) and returns its bits.
///
/// Magnitudes below `f32::MIN_POSITIVE` (2⁻¹²⁶) become zero, as `vdpbf16ps` treats subnormal inputs;
/// every other finite value keeps a relative error of at most 2⁻⁸ and stays a normal number.
pub(crate) fn to_bf16(x: f32) -> u16 {
    if x.abs() < f32::MIN_POSITIVE {
        return 0;
    }
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    (rounded >> 16) as u16
}

/// Packs `rows` (row-major, `dim` columns) as bfloat16 pairs into panels of `width` rows: element
/// `kp·width + lane` of a panel holds dimensions `2·kp` (low half) and `2·kp + 1` (high half) of
/// row `lane`, so that one 32-bit lane of `vdpbf16ps` multiplies matching dimension pairs. An odd
/// last dimension and rows past the end are zero.
pub(crate) fn pack_bf16(rows: &[f32], dim: usize, width: usize) -> Vec<u32> {
    let pairs = dim.div_ceil(2);
    let mut packed = vec![0u32; (rows.len() / dim).div_ceil(width) * width * pairs];
    pack_bf16_into(&mut packed, rows, dim, width);
    packed
}

/// [`pack_bf16`] into `packed`, which must hold whole panels for every row and zeros where no
/// row lands.
pub(crate) fn pack_bf16_into(packed: &mut [u32], rows: &[f32], dim: usize, width: usize) {
    let pairs = dim.div_ceil(2);
    for (r, row) in rows.chunks_exact(dim).enumerate() {
        let panel = &mut packed[(r / width) * width * pairs..][..width * pairs];
        let lane = r % width;
        for (kp, pair) in row.chunks(2).enumerate() {
            let lo = u32::from(to_bf16(pair[0]));
            let hi = pair.get(1).map_or(0, |&v| u32::from(to_bf16(v)));
            panel[kp * width + lane] = lo | (hi << 16);
        }
    }
}

/// One arithmetic of the micro-kernel: the element type of the packed panels and the product of
/// one query panel with one bank panel over a slice of `steps` packed elements.
pub(crate) trait Arithmetic {
    /// One packed element: an `f32`, or a pair of bfloat16 values.
    type Elem: Copy;
    /// Packed elements per pass, sized so that the slice of the bank panel in use (32 KiB) stays
    /// in the L1 cache while the query panels stream from L2.
    const SLICE: usize;

    /// Adds the `MR × NR` dot products of `steps` packed elements of a query panel and a bank
    /// panel to `acc`.
    ///
    /// # Safety
    ///
    /// The CPU must support the arithmetic's instructions; `q` must point to `MR × steps` and `b`
    /// to `NR × steps` readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn multiply(
        acc: &mut [[__m512; 2]; MR],
        q: *const Self::Elem,
        b: *const Self::Elem,
        steps: usize,
    );
}

/// Dot products in `f32` with fused multiply-adds (AVX-512F).
pub(crate) struct F32;

/// Dot products of bfloat16 pairs accumulated in `f32` (`vdpbf16ps`, AVX512-BF16).
pub(crate) struct Bf16;

impl Arithmetic for F32 {
    type Elem = f32;
    const SLICE: usize = 256;

    #[cfg(target_arch = "x86_64")]
    unsafe fn multiply(acc: &mut [[__m512; 2]; MR], q: *const f32, b: *const f32, steps: usize) {
        // SAFETY: forwarded from the caller.
        unsafe { micro_kernel(acc, q, b, steps) }
    }
}

impl Arithmetic for Bf16 {
    type Elem = u32;
    const SLICE: usize = 256;

    #[cfg(target_arch = "x86_64")]
    unsafe fn multiply(acc: &mut [[__m512; 2]; MR], q: *const u32, b: *const u32, steps: usize) {
        // SAFETY: forwarded from the caller.
        unsafe { micro_kernel_bf16(acc, q, b, steps) }
    }
}

/// Offers the GEMM distances of queries `q0..` (packed in `queries`, `MR` per panel) to bank
/// panels `range` of `bank` to the queries' shortlists.
///
/// `query_norms[i]` and `lists[i]` belong to query `i` of the block; a `None` list is skipped.
/// `steps` is the number of packed elements per row: `dim` for [`F32`], `dim.div_ceil(2)` for
/// [`Bf16`].
///
/// # Safety
///
/// The CPU must support AVX-512F and the arithmetic `A` ([`available`], [`available_bf16`]).
/// `queries` must hold `lists.len().div_ceil(MR)` panels of `MR × steps` elements, and `bank` at
/// least `range.end` panels of `NR × steps` elements and `NR · range.end` norms.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn scan_panels<A: Arithmetic>(
    queries: &[A::Elem],
    query_norms: &[f32],
    lists: &mut [Option<Shortlist>],
    bank: Panels<'_, A::Elem>,
    steps: usize,
    range: std::ops::Range<usize>,
) {
    let Panels {
        values: bank,
        norms: bank_norms,
    } = bank;
    let (p0, p1) = (range.start, range.end);
    let m = lists.len();
    let tiles = m.div_ceil(MR);
    debug_assert!(queries.len() >= tiles * MR * steps);
    debug_assert!(bank.len() >= p1 * NR * steps);
    debug_assert!(bank_norms.len() >= p1 * NR);
    // The dot products are accumulated over slices of `A::SLICE` elements; partial sums wait in
    // `partial` between slices.
    let mut partial = vec![[[_mm512_setzero_ps(); 2]; MR]; tiles];
    for p in p0..p1 {
        let panel = &bank[p * NR * steps..(p + 1) * NR * steps];
        let norms = &bank_norms[p * NR..(p + 1) * NR];
        let mut k0 = 0;
        while k0 < steps {
            let kc = A::SLICE.min(steps - k0);
            for (t, acc) in partial.iter_mut().enumerate() {
                if k0 == 0 {
                    *acc = [[_mm512_setzero_ps(); 2]; MR];
                }
                let tile = &queries[t * MR * steps + k0 * MR..][..kc * MR];
                // SAFETY: the caller guarantees the instructions; `tile` holds `MR × kc` and the
                // panel slice `NR × kc` elements.
                unsafe { A::multiply(acc, tile.as_ptr(), panel[k0 * NR..].as_ptr(), kc) };
            }
            k0 += kc;
        }
        for (t, acc) in partial.iter().enumerate() {
            let rows = (m - t * MR).min(MR);
            // SAFETY: as above; `norms` holds `NR` values.
            unsafe {
                offer(
                    acc,
                    &query_norms[t * MR..t * MR + rows],
                    &mut lists[t * MR..t * MR + rows],
                    norms,
                    (p * NR) as u32,
                )
            };
        }
    }
}

/// Adds the `MR × NR` dot products of `kc` dimensions of a query panel and a bank panel to `acc`.
///
/// # Safety
///
/// AVX-512F must be available; `q` must point to `MR × kc` and `b` to `NR × kc` readable values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn micro_kernel(acc: &mut [[__m512; 2]; MR], q: *const f32, b: *const f32, kc: usize) {
    let mut sums = *acc;
    let mut q = q;
    let mut b = b;
    for _ in 0..kc {
        // SAFETY: fewer than `kc` steps of `MR` and `NR` values stay inside the panels.
        unsafe {
            let b0 = _mm512_loadu_ps(b);
            let b1 = _mm512_loadu_ps(b.add(16));
            for (i, row) in sums.iter_mut().enumerate() {
                let a = _mm512_set1_ps(*q.add(i));
                row[0] = _mm512_fmadd_ps(a, b0, row[0]);
                row[1] = _mm512_fmadd_ps(a, b1, row[1]);
            }
            q = q.add(MR);
            b = b.add(NR);
        }
    }
    *acc = sums;
}

/// Adds the `MR × NR` dot products of `kc` bfloat16 dimension pairs of a query panel and a bank
/// panel to `acc`: each step multiplies two dimensions exactly and adds both products to the
/// `f32` sums (`vdpbf16ps`, which flushes subnormal results to zero).
///
/// # Safety
///
/// AVX-512F and AVX512-BF16 must be available; `q` must point to `MR × kc` and `b` to `NR × kc`
/// readable pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn micro_kernel_bf16(acc: &mut [[__m512; 2]; MR], q: *const u32, b: *const u32, kc: usize) {
    let mut sums = *acc;
    let mut q = q;
    let mut b = b;
    for _ in 0..kc {
        // SAFETY: fewer than `kc` steps of `MR` and `NR` pairs stay inside the panels; the
        // transmutes reinterpret 512 bits of packed pairs as 32 bfloat16 values.
        unsafe {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(16).cast()));
            for (i, row) in sums.iter_mut().enumerate() {
                let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(*q.add(i) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], a, b0);
                row[1] = _mm512_dpbf16_ps(row[1], a, b1);
            }
            q = q.add(MR);
            b = b.add(NR);
        }
    }
    *acc = sums;
}

/// Turns one tile of dot products into GEMM distances `(‖x‖² + ‖y‖²) − 2·x·y` and offers those
/// at or below each query's threshold to its shortlist.
///
/// # Safety
///
/// AVX-512F must be available; `bank_norms` must hold `NR` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn offer(
    acc: &[[__m512; 2]; MR],
    query_norms: &[f32],
    lists: &mut [Option<Shortlist>],
    bank_norms: &[f32],
    base: u32,
) {
    // SAFETY: `bank_norms` holds `NR = 32` values.
    let (n0, n1) = unsafe {
        (
            _mm512_loadu_ps(bank_norms.as_ptr()),
            _mm512_loadu_ps(bank_norms.as_ptr().add(16)),
        )
    };
    let two = _mm512_set1_ps(2.0);
    for ((row, &qn), list) in acc.iter().zip(query_norms).zip(lists.iter_mut()) {
        let Some(list) = list else { continue };
        let qn = _mm512_set1_ps(qn);
        let d0 = _mm512_sub_ps(_mm512_add_ps(qn, n0), _mm512_mul_ps(two, row[0]));
        let d1 = _mm512_sub_ps(_mm512_add_ps(qn, n1), _mm512_mul_ps(two, row[1]));
        let threshold = _mm512_set1_ps(list.threshold());
        let hits0 = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(d0, threshold);
        let hits1 = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(d1, threshold);
        if hits0 | hits1 == 0 {
            continue;
        }
        let mut values = [0f32; NR];
        // SAFETY: `values` holds 32 floats.
        unsafe {
            _mm512_storeu_ps(values.as_mut_ptr(), d0);
            _mm512_storeu_ps(values.as_mut_ptr().add(16), d1);
        }
        let mut hits = u32::from(hits0) | (u32::from(hits1) << 16);
        while hits != 0 {
            let j = hits.trailing_zeros();
            hits &= hits - 1;
            list.offer(values[j as usize], base + j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_to_nearest_even_and_flushes_tiny_values() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        assert_eq!(to_bf16(-2.0), 0xc000);
        // 1 + 2⁻⁸ lies halfway between 1 and 1 + 2⁻⁷: ties go to the even significand (1).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2⁻⁸ lies halfway between 1 + 2⁻⁷ (odd) and 1 + 2⁻⁶ (even).
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        // Just above the halfway point rounds up.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0 + 1.0 / 65536.0), 0x3f81);
        assert_eq!(to_bf16(f32::MIN_POSITIVE / 2.0), 0);
        assert_eq!(to_bf16(-1e-40), 0);
        assert_eq!(to_bf16(f32::MIN_POSITIVE), 0x0080);
    }

    #[test]
    fn bf16_relative_error_is_at_most_two_to_the_minus_eight() {
        let mut state = 7u64;
        for _ in 0..100_000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let x = f32::from_bits((state >> 32) as u32);
            if !x.is_finite() || x.abs() < f32::MIN_POSITIVE || x.abs() > 1e38 {
                continue;
            }
            let y = f32::from_bits(u32::from(to_bf16(x)) << 16);
            let error = (f64::from(y) - f64::from(x)).abs() / f64::from(x).abs();
            assert!(error <= 1.0 / 256.0, "{x} -> {y}");
        }
    }

    #[test]
    fn bf16_pairs_are_packed_low_then_high_with_zero_padding() {
        // Two rows of three dimensions in panels of width 2: pairs (d0, d1) and (d2, 0).
        let packed = pack_bf16(&[1.0, 2.0, 3.0, -1.0, -2.0, -3.0], 3, 2);
        assert_eq!(
            packed,
            vec![0x4000_3f80, 0xc000_bf80, 0x0000_4040, 0x0000_c040]
        );
        // A third row starts a second, zero-padded panel.
        assert_eq!(pack_bf16(&[1.0; 9], 3, 2).len(), 8);
    }
}
