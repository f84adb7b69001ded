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
//! * The micro-kernel multiplies one query panel by one bank panel: `MR × NR` dot products of
//!   length `dim`, accumulated in 28 registers with one fused multiply-add per element and
//!   summed in order `k = 0, 1, …` per dot product. The error bound of the shortlist (see the
//!   `exact` module) holds for any summation order, with or without fused multiply-adds.
//!
//! The kernel is only used when the CPU reports AVX-512F at run time; otherwise the index falls
//! back to the portable `gemm` crate path. Both give bit-identical search results because the
//! shortlist is followed by exact rescoring.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::exact::Shortlist;

/// Queries per micro-kernel panel.
pub(crate) const MR: usize = 14;
/// Bank rows per micro-kernel panel (two 16-lane vectors).
pub(crate) const NR: usize = 32;
/// Dimensions per pass of the micro-kernel: `NR × KC` values of a bank panel (32 KiB) fit the L1
/// data cache.
const KC: usize = 256;

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
    let n = rows.len() / dim;
    let panels = n.div_ceil(width);
    let mut packed = vec![0f32; panels * width * dim];
    for (r, row) in rows.chunks_exact(dim).enumerate() {
        let panel = &mut packed[(r / width) * width * dim..][..width * dim];
        let lane = r % width;
        for (k, &v) in row.iter().enumerate() {
            panel[k * width + lane] = v;
        }
    }
    packed
}

/// The packed, centred bank: panels of [`NR`] rows and one squared norm per packed row.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Panels<'a> {
    /// `NR × dim` values per panel, laid out as described in the module documentation.
    pub(crate) values: &'a [f32],
    /// The squared norm of every packed row; NaN for the padding rows.
    pub(crate) norms: &'a [f32],
}

/// Offers the GEMM distances of queries `q0..` (packed in `queries`, `MR` per panel) to bank
/// panels `range` of `bank` to the queries' shortlists.
///
/// `query_norms[i]` and `lists[i]` belong to query `i` of the block; a `None` list is skipped.
///
/// # Safety
///
/// The CPU must support AVX-512F ([`available`]). `queries` must hold `lists.len().div_ceil(MR)`
/// panels of `MR × dim` values, and `bank` at least `range.end` panels of `NR × dim` values
/// and `NR · range.end` norms.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn scan_panels(
    queries: &[f32],
    query_norms: &[f32],
    lists: &mut [Option<Shortlist>],
    bank: Panels<'_>,
    dim: usize,
    range: std::ops::Range<usize>,
) {
    let Panels {
        values: bank,
        norms: bank_norms,
    } = bank;
    let (p0, p1) = (range.start, range.end);
    let m = lists.len();
    let tiles = m.div_ceil(MR);
    debug_assert!(queries.len() >= tiles * MR * dim);
    debug_assert!(bank.len() >= p1 * NR * dim);
    debug_assert!(bank_norms.len() >= p1 * NR);
    // The dot products are accumulated over slices of `KC` dimensions, so that the slice of the
    // bank panel in use (32 KiB) stays in the L1 cache while the query panels stream from L2;
    // partial sums wait in `partial` between slices.
    let mut partial = vec![[[_mm512_setzero_ps(); 2]; MR]; tiles];
    for p in p0..p1 {
        let panel = &bank[p * NR * dim..(p + 1) * NR * dim];
        let norms = &bank_norms[p * NR..(p + 1) * NR];
        let mut k0 = 0;
        while k0 < dim {
            let kc = KC.min(dim - k0);
            for (t, acc) in partial.iter_mut().enumerate() {
                if k0 == 0 {
                    *acc = [[_mm512_setzero_ps(); 2]; MR];
                }
                let tile = &queries[t * MR * dim + k0 * MR..][..kc * MR];
                // SAFETY: AVX-512F is enabled for this function; `tile` holds `MR × kc` and the
                // panel slice `NR × kc` values.
                unsafe { micro_kernel(acc, tile.as_ptr(), panel[k0 * NR..].as_ptr(), kc) };
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
