//! Property tests: unfold, pooling and score folding against direct formulas.

use ndarray::{Array3, Array4, Axis};
use patchcore_patch::{
    adaptive_avg_pool1d, adaptive_pool_bins, image_scores, unpatch_scores, EmbedConfig, Embedder,
    PatchMaker,
};
use proptest::prelude::*;

proptest! {
    /// Pooling equals the direct definition: mean over floor(i·L/n) .. ceil((i+1)·L/n).
    #[test]
    fn pooling_matches_direct_formula(values in prop::collection::vec(-100.0f32..100.0, 1..200), out in 1usize..300) {
        let bins = adaptive_pool_bins(values.len(), out);
        let mut got = vec![0.0; out];
        adaptive_avg_pool1d(&values, &bins, &mut got);
        let l = values.len() as f64;
        for (i, g) in got.iter().enumerate() {
            let start = ((i as f64) * l / out as f64).floor() as usize;
            let end = (((i + 1) as f64) * l / out as f64).ceil() as usize;
            let want = values[start..end].iter().map(|&v| v as f64).sum::<f64>() / (end - start) as f64;
            prop_assert!((*g as f64 - want).abs() <= 1e-3 * (1.0 + want.abs()));
        }
    }

    /// Unfolded rows hold the map value at the centre tap, and the grid size follows the original's formula.
    #[test]
    fn unfold_shapes_and_order(c in 1usize..4, h in 1usize..7, w in 1usize..7, size in prop::sample::select(vec![1usize, 3, 5]), stride in 1usize..3) {
        let maker = PatchMaker { size, stride };
        let map = Array3::from_shape_fn((c, h, w), |(ch, y, x)| (ch * 100 + y * 10 + x) as f32);
        let pad = (size - 1) / 2;
        prop_assume!(h + 2 * pad >= size && w + 2 * pad >= size);
        let rows = maker.unfold(map.view()).unwrap();
        let (gh, gw) = maker.grid(h, w).unwrap();
        prop_assert_eq!(gh, (h + 2 * pad - (size - 1) - 1) / stride + 1);
        prop_assert_eq!(rows.dim(), (gh * gw, c * size * size));
        for gy in 0..gh {
            for gx in 0..gw {
                for ch in 0..c {
                    // The centre of the kernel is (gy·stride, gx·stride) in map coordinates when size = 2·pad + 1.
                    let (y, x) = (gy * stride, gx * stride);
                    let centre = ch * size * size + pad * size + pad;
                    prop_assert_eq!(rows[[gy * gw + gx, centre]], map[[ch, y, x]]);
                }
            }
        }
    }

    /// Embedding rows are image-major: embedding a batch equals embedding each image alone.
    #[test]
    fn batch_rows_are_image_major(b in 1usize..4, h in 2usize..6) {
        let cfg = EmbedConfig { patch: PatchMaker::inspection(), pretrain_dim: 8, target_dim: 4 };
        let e = Embedder::new(cfg).unwrap();
        let l0 = Array4::from_shape_fn((b, 2, h, h), |(i, c, y, x)| ((i * 7 + c * 3 + y * 5 + x) % 11) as f32);
        let l1 = Array4::from_shape_fn((b, 3, h.div_ceil(2), h.div_ceil(2)), |(i, c, y, x)| ((i + c + y * 2 + x) % 5) as f32);
        let all = e.embed(&[l0.view(), l1.view()]).unwrap();
        let per = all.grid.0 * all.grid.1;
        for i in 0..b {
            let a0 = l0.index_axis(Axis(0), i).insert_axis(Axis(0));
            let a1 = l1.index_axis(Axis(0), i).insert_axis(Axis(0));
            let one = e.embed(&[a0, a1]).unwrap();
            for r in 0..per {
                prop_assert_eq!(one.rows.row(r), all.rows.row(i * per + r));
            }
        }
    }

    /// Folding scores and taking the maximum equals the per-image maximum of the flat vector.
    #[test]
    fn unpatch_then_max(batch in 1usize..5, per in 1usize..20, seed in 0u64..1000) {
        let scores: Vec<f32> = (0..batch * per).map(|i| ((i as u64 * 2654435761 + seed) % 1000) as f32).collect();
        let grid = unpatch_scores(&scores, batch).unwrap();
        prop_assert_eq!(grid.dim(), (batch, per));
        let max = image_scores(grid.view());
        for i in 0..batch {
            let want = scores[i * per..(i + 1) * per].iter().cloned().fold(f32::MIN, f32::max);
            prop_assert_eq!(max[i], want);
        }
    }
}
