#!/usr/bin/env python3
"""Write the ResNet / WideResNet parity fixtures of the backbone crate from torchvision.

Development only: neither the build nor the tests run this script, and nothing in the repository needs Python or
PyTorch to build or test. It needs torch, torchvision, numpy and safetensors:

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch torchvision numpy safetensors
    /tmp/torchenv/bin/python scripts/make_resnet_fixtures.py

It writes two kinds of fixtures into crates/backbone/tests/data/.

1. resnet_taps.safetensors: every architecture, full depth, every tap.
   A full WideResNet-50-2 state dict is about 270 MB in f32 (WideResNet-101-2 about 500 MB), far more than the
   fixture budget, and torch's random generator cannot be reproduced in Rust. So the weights of this fixture come
   from a small documented formula that both this script and the Rust test evaluate bit for bit (`formula` below):
   every element of every float tensor is a uniform number in a range chosen by the key's role, drawn from a
   counter-based hash of (key, element index). Only the key list with shapes (from torchvision's own state dict),
   the input and the tap outputs are stored. For each of resnet18/34/50/101/152 and wide_resnet50_2/101_2 the
   script builds `torchvision.models.<arch>(weights=None)`, loads the formula weights with
   `load_state_dict(strict=True)` (so the key set is exactly torchvision's), puts the model in eval mode and runs a
   (2, 3, 40, 56) input, recording the outputs of layer1 … layer4 with forward hooks. The Rust test rebuilds the
   same weights under exactly the stored keys, runs its own model and compares every tap.

   The formula, for a float tensor named `key` with n elements in row-major order:
       h     = FNV-1a 64-bit hash of the key's UTF-8 bytes
       z_i   = splitmix64(h + (i + 1) * 0x9E3779B97F4A7C15 mod 2^64),  i = 0 … n − 1
       u_i   = (z_i >> 40) / 2^24                      (exact in f64, in [0, 1))
       x_i   = f32(lo + (hi − lo) * u_i)               (computed in f64, rounded once to f32)
   with (lo, hi) by the key's role:
       conv weights (…conv*.weight, …downsample.0.weight), fan_in = C_in·k·k:  ±sqrt(6 / fan_in) (He uniform),
           scaled by 1/2 for the last convolution of a residual branch and for the projection
       batch-norm weight 0.5 … 1.0, bias −0.1 … 0.1, running_mean −0.1 … 0.1, running_var 0.5 … 1.5
   splitmix64(z): z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31
   (all mod 2^64). The halved branch ends keep the activations of the 50 residual blocks of ResNet-152 in a sane
   range, so the relative error stays meaningful at every depth.

2. resnet50_layer1.pth (zip serialisation), resnet50_layer1_legacy.pth (the pre-1.6 serialisation,
   `_use_new_zipfile_serialization=False`) and resnet50_layer1_module.safetensors (the same tensors under
   `module.`-prefixed keys, as `nn.DataParallel` leaves them; timm's `tv_in1k` files use torchvision's key names).
   These are real `torch.save(model.state_dict())` outputs of a torchvision ResNet-50 with torch-seeded random
   weights (torchvision's own initialisation, batch-norm statistics randomised with torch's generator), cut to the
   stem and layer1 and stored as f16 to stay small. They prove the loading paths on files torch itself wrote.
   resnet50_layer1_taps.safetensors holds the input and the layer1 output of that model (with the f16-rounded
   weights, computed in f32).
"""
import json
import math
from pathlib import Path

import numpy as np
import torch
import torchvision
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch_file

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "crates/backbone/tests/data"
ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2"]
INPUT_SHAPE = (2, 3, 40, 56)
TAPS = ["layer1", "layer2", "layer3", "layer4"]
M64 = (1 << 64) - 1


def fnv1a64(key: str) -> int:
    h = 0xCBF29CE484222325
    for b in key.encode("utf-8"):
        h ^= b
        h = (h * 0x100000001B3) & M64
    return h


def uniform(key: str, n: int, lo: float, hi: float) -> np.ndarray:
    """The formula of the module docstring: n f32 values in [lo, hi) for `key`."""
    i = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(fnv1a64(key)) + i * np.uint64(0x9E3779B97F4A7C15)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    u = (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)
    return (lo + (hi - lo) * u).astype(np.float32)


def is_branch_end(key: str, basic: bool) -> bool:
    """The last convolution of a residual branch, or the projection."""
    last = "conv2" if basic else "conv3"
    return key.endswith(f".{last}.weight") or key.endswith(".downsample.0.weight")


def formula(key: str, shape: tuple, basic: bool) -> np.ndarray:
    n = int(np.prod(shape))
    if len(shape) == 4:
        fan_in = shape[1] * shape[2] * shape[3]
        a = math.sqrt(6.0 / fan_in)
        if is_branch_end(key, basic):
            a *= 0.5
        lo, hi = -a, a
    elif key.endswith(".running_var"):
        lo, hi = 0.5, 1.5
    elif key.endswith(".running_mean") or key.endswith(".bias"):
        lo, hi = -0.1, 0.1
    elif key.endswith(".weight"):
        lo, hi = 0.5, 1.0
    else:
        raise ValueError(f"no formula for {key} {shape}")
    return uniform(key, n, lo, hi).reshape(shape)


def run_taps(model: torch.nn.Module, x: torch.Tensor) -> dict:
    outs = {}
    hooks = [getattr(model, t).register_forward_hook(lambda m, i, o, t=t: outs.__setitem__(t, o)) for t in TAPS]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return outs


def formula_fixture() -> None:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(INPUT_SHAPE, generator=g)
    tensors = {"input": x.numpy()}
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__, "input_shape": json.dumps(INPUT_SHAPE)}
    for arch in ARCHS:
        model = getattr(torchvision.models, arch)(weights=None).eval()
        basic = isinstance(model.layer1[0], torchvision.models.resnet.BasicBlock)
        sd = model.state_dict()
        keys = []
        for k, v in sd.items():
            if k.startswith("fc.") or k.endswith("num_batches_tracked"):
                continue
            sd[k] = torch.from_numpy(formula(k, tuple(v.shape), basic))
            keys.append([k, list(v.shape)])
        # The classifier is not part of the feature extractor; give it finite values all the same.
        sd["fc.weight"] = torch.zeros_like(sd["fc.weight"])
        sd["fc.bias"] = torch.zeros_like(sd["fc.bias"])
        model.load_state_dict(sd, strict=True)
        outs = run_taps(model, x)
        for t in TAPS:
            o = outs[t].numpy()
            tensors[f"{arch}.{t}"] = o
            print(f"{arch}.{t}: {o.shape} max|x| {np.abs(o).max():.3g} std {o.std():.3g} zeros {(o == 0).mean():.2f}")
        meta[f"{arch}.keys"] = json.dumps(keys)
    out = DATA / "resnet_taps.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out), metadata=meta)
    print(out, out.stat().st_size)


def torch_saved_fixture() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.4 * torch.rand(c, generator=g) - 0.2)
                m.running_mean.copy_(0.4 * torch.rand(c, generator=g) - 0.2)
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.num_batches_tracked.fill_(123)
    # Stem and layer1 only, f16 (the counters stay int64, as torch keeps them).
    sd = {
        k: (v.half() if v.is_floating_point() else v)
        for k, v in model.state_dict().items()
        if k.split(".")[0] in ("conv1", "bn1", "layer1")
    }
    torch.save(sd, DATA / "resnet50_layer1.pth")
    torch.save(sd, DATA / "resnet50_layer1_legacy.pth", _use_new_zipfile_serialization=False)
    save_torch_file({f"module.{k}": v.contiguous() for k, v in sd.items()}, str(DATA / "resnet50_layer1_module.safetensors"))
    # The reference output with exactly the stored (f16-rounded) weights, computed in f32.
    full = model.state_dict()
    full.update({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    model.load_state_dict(full, strict=True)
    x = torch.randn((2, 3, 40, 56), generator=torch.Generator().manual_seed(99))
    layer1 = run_taps(model, x)["layer1"]
    save_file(
        {"input": x.numpy(), "layer1": np.ascontiguousarray(layer1.numpy())},
        str(DATA / "resnet50_layer1_taps.safetensors"),
        metadata={"torch": torch.__version__, "torchvision": torchvision.__version__},
    )
    for name in ["resnet50_layer1.pth", "resnet50_layer1_legacy.pth", "resnet50_layer1_module.safetensors",
                 "resnet50_layer1_taps.safetensors"]:
        print(DATA / name, (DATA / name).stat().st_size)


if __name__ == "__main__":
    torch.set_num_threads(2)
    formula_fixture()
    torch_saved_fixture()
