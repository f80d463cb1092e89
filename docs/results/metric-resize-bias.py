"""The perfect-generator table: N training images (at the training size, as the loader makes them) scored as a
generator's output against the test reference, vs the train-vs-test floor at the metric size."""
import sys, time, json
import torch
from gantrain.engine.data.sources import load_images
from gantrain.engine.data.pixels import to_unit
from gantrain.engine.metrics.evaluate import load_reference, extract, compare
from gantrain.engine.metrics.generated import prepare_generated
from gantrain.engine.metrics.reference import DatasetSpec, data_root
from pathlib import Path

cache = sys.argv[1]; n = int(sys.argv[2]); which = sys.argv[3:]
rows = []
cases = {"fashion": ("fashion-mnist", "../shared/datasets", 1, (32, 64, 128)),
         "cats": ("folder", "../shared/datasets/cats", 3, (64, 128))}
for name in which:
    dataset, root, ch, sizes = cases[name]
    for size, fixed in [(s, f) for s in sizes for f in (False, True)]:
        spec = DatasetSpec(dataset, Path(root), ch, train_px=size if fixed else None)
        ref = load_reference(spec, cache=cache, quiet=True)
        px = size
        imgs = load_images(dataset, root, px, ch, limit=n)
        # training images in the generator's role (its train split would be ideal; these are the loader's first n)
        fake = to_unit(imgs)
        batches = (prepare_generated(c, spec) for c in fake.split(500))
        feats, probs = extract(ref.extractor, batches, len(fake), "x", quiet=True)
        v = compare(feats, probs, ref)
        rows.append({"data": name, "train_px": size, "reference": "same road" if fixed else "direct (before)", "metric_px": spec.size_px, "n": len(fake),
                     **{k: round(v[k], 4) for k in ("fd", "kid_mean", "precision", "recall")}})
        print(json.dumps(rows[-1]), flush=True)
