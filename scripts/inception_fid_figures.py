"""Measures the standard (Inception) FID figures the README quotes: real FashionMNIST train vs test, and the
seconds per 1000 images of the Inception network on this machine. Usage:

    python scripts/inception_fid_figures.py --data-root ../shared/datasets -n 2000 --json fid_real.json

Both sets are random subsets (seeded) of the official splits at the 32-px size training uses; the test subset
is the one `gantrain eval --inception -n N` compares against (and is cached for it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gantrain.engine.metrics import inception as inc
from gantrain.engine.metrics.reference import load_split, parse_dataset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=None)
    parser.add_argument("-n", type=int, default=2000, help="images per set")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    spec = parse_dataset("fashion-mnist", args.data_root)
    net = inc.load_inception("cpu")
    train = load_split(spec, "train").images
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[: args.n]
    started = time.perf_counter()
    train_features, _ = inc.extract_features(net, train[order].split(500))
    seconds = time.perf_counter() - started
    test_features = inc.real_inception_features(net, spec, args.n)
    scores = inc.inception_scores(train_features, test_features)
    result = {"what": f"FashionMNIST {args.n} train vs {args.n} test images", **scores,
              "seconds_per_1000_images": round(1000 * seconds / args.n, 1), "threads": torch.get_num_threads(),
              "network": net.provenance}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
