#!/usr/bin/env python3
"""Time torchvision's WideResNet-50-2 up to layer3 at 224 x 224 on the CPU, for docs/benchmarks.md.

Development only. The same forward as `cargo bench -p patchcore-benches --bench resnet`: conv1, bn1, relu,
maxpool, layer1, layer2, layer3 in eval mode under torch.inference_mode(), random weights (the work does not depend
on the values), batch 1 and 8, float32, the thread count given (default 2, the development machine's cores).

    /tmp/torchenv/bin/pip install torch torchvision
    /tmp/torchenv/bin/python scripts/bench_resnet_torch.py [threads]
"""
import statistics
import sys
import time

import torch
import torchvision


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = torchvision.models.wide_resnet50_2(weights=None).eval()
    net = torch.nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3).eval()
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, threads {torch.get_num_threads()}, "
          f"mkldnn {torch.backends.mkldnn.is_available()}")
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        with torch.inference_mode():
            for _ in range(3):
                net(x)
            times = []
            budget = time.perf_counter() + 20.0
            while len(times) < 10 or (time.perf_counter() < budget and len(times) < 100):
                t0 = time.perf_counter()
                net(x)
                times.append(time.perf_counter() - t0)
        print(f"batch {batch}: median {statistics.median(times) * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms "
              f"over {len(times)} runs")


if __name__ == "__main__":
    main()
