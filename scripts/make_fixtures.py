#!/usr/bin/env python3
"""Cut the small test fixtures out of the reference goldens.

Development only: neither the build nor the tests run this script. It reads the stage-by-stage goldens that the
original implementation (patchcore-inspection) produced on real ELPV images, and writes small slices of them next
to the tests of each crate, so that the tests run on a fresh clone without the goldens.

    pip install numpy safetensors
    python3 scripts/make_fixtures.py /path/to/lite0_elpv_k1.safetensors /path/to/elpv_dataset/data/images

Fixtures written (all little-endian safetensors, f32 unless noted):
  crates/backbone/tests/data/lite0_taps.safetensors     test image 1 (cell0001): input as u8 grey, both taps
  crates/patch/tests/data/lite0_embedding.safetensors   the same taps, and every 7th embedding row of that image
  crates/knn/tests/data/lite0_search.safetensors        the memory bank, those rows as queries, nn results
  crates/coreset/tests/data/lite0_coreset.safetensors   projected training features, start points, picks
  crates/segmentation/tests/data/lite0_maps.safetensors patch scores and anomaly maps of both test images
  crates/patchcore/tests/data/                          the five PNGs, both test inputs as u8, scores
"""
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    golden, images = Path(sys.argv[1]), Path(sys.argv[2])
    g = {}
    with safe_open(str(golden), "np") as f:
        meta = f.metadata()
        for k in f.keys():
            g[k] = f.get_tensor(k)

    def as_u8(x: np.ndarray) -> np.ndarray:
        # The inputs are (u8 - 127) / 128 on every channel of a grey image; recover the u8 grey plane exactly.
        u = np.round(x[0] * 128.0 + 127.0)
        assert np.abs(u - (x[0] * 128.0 + 127.0)).max() < 1e-3
        assert (x[0] == x[1]).all() and (x[0] == x[2]).all()
        back = ((u.astype(np.float32) / np.float32(255.0)) - np.float32(127.0 / 255.0)) / np.float32(128.0 / 255.0)
        assert np.abs(back - x[0]).max() < 1e-6
        return u.astype(np.uint8)

    img = 1  # cell0001, the defective test image
    rows_local = np.arange(0, 784, 7, dtype=np.int64)
    rows = rows_local + 784 * img

    def out(path: str, tensors: dict) -> None:
        p = ROOT / path
        p.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(p), metadata=meta)
        print(p, p.stat().st_size)

    out("crates/backbone/tests/data/lite0_taps.safetensors", {
        "input_u8": as_u8(g["test_input"][img]),
        "tap_blocks4": g["test_tap_blocks4"][img],
        "tap_blocks10": g["test_tap_blocks10"][img],
    })
    out("crates/patch/tests/data/lite0_embedding.safetensors", {
        "tap_blocks4": g["test_tap_blocks4"][img],
        "tap_blocks10": g["test_tap_blocks10"][img],
        "rows": rows_local,
        "embedding_rows": g["test_embedding"][rows],
    })
    out("crates/knn/tests/data/lite0_search.safetensors", {
        "memory_bank": g["memory_bank"],
        "queries": g["test_embedding"][rows],
        "nn_distances": g["test_nn_distances"][rows, 0],
        "nn_indices": g["test_nn_indices"][rows, 0],
    })

    # The original projects with torch.nn.Linear (reduced = x · Pᵀ) in f32; numpy's f32 product differs only in
    # summation order. Check that the picks it gives equal the stored picks before writing the fixture.
    proj = g["coreset_projection"]
    reduced = (g["train_embedding"] @ proj.T).astype(np.float32)
    picks = greedy(reduced, g["coreset_start_points"], len(g["coreset_indices"]))
    assert (picks == g["coreset_indices"]).all(), "numpy re-run of the coreset does not match the goldens"
    sample = np.arange(0, 2352, 293, dtype=np.int64)
    out("crates/coreset/tests/data/lite0_coreset.safetensors", {
        "reduced": reduced,
        "start_points": g["coreset_start_points"],
        "coreset_indices": g["coreset_indices"],
        "projection": proj,
        "sample_rows": sample,
        "sample_embedding": g["train_embedding"][sample],
        "sample_reduced": reduced[sample],
    })
    out("crates/segmentation/tests/data/lite0_maps.safetensors", {
        "patch_scores": g["test_patch_scores"],
        "anomaly_maps": g["test_anomaly_maps"],
    })
    data = ROOT / "crates/patchcore/tests/data"
    data.mkdir(parents=True, exist_ok=True)
    for name in ["cell0004.png", "cell0009.png", "cell0060.png", "cell0011.png", "cell0001.png"]:
        shutil.copyfile(images / name, data / name)
    out("crates/patchcore/tests/data/lite0_pipeline.safetensors", {
        "train_input_u8": np.stack([as_u8(x) for x in g["train_input"]]),
        "test_input_u8": np.stack([as_u8(x) for x in g["test_input"]]),
        "test_nn_distances": g["test_nn_distances"][:, 0],
        "test_image_scores": g["test_image_scores"],
        "rows": rows,
        "test_embedding_rows": g["test_embedding"][rows],
        "memory_bank": g["memory_bank"],
    })


def greedy(r: np.ndarray, starts: np.ndarray, n: int) -> np.ndarray:
    """The original's approximate greedy coreset on already projected features (float32 throughout)."""
    def dist(a, b):
        aa = (a * a).sum(1, dtype=np.float32)[:, None]
        bb = (b * b).sum(1, dtype=np.float32)[None, :]
        return np.sqrt(np.clip(-2 * (a @ b.T) + aa + bb, 0, None))
    d = dist(r, r[starts]).mean(-1)
    picks = []
    for _ in range(n):
        i = int(np.argmax(d))
        picks.append(i)
        d = np.minimum(d, dist(r, r[i:i + 1])[:, 0])
    return np.array(picks, dtype=np.int64)


if __name__ == "__main__":
    main()
