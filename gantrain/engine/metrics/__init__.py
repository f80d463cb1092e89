"""Quality metrics that work offline: Fréchet distance, KID, precision/recall and a classifier score in the
features of a small domain extractor trained on the dataset itself (no downloaded Inception weights).

* :func:`evaluate_generator`: generator + config -> metrics dict (the objective of ``gantrain tune``).
* :class:`Evaluator`: the same with the class histogram and timings, and the real-vs-real floor.
* :func:`ensure_extractor`: the cached extractor of a dataset, fitted when missing.
"""

from gantrain.engine.metrics.evaluate import METRIC_KEYS, Evaluator, MetricReport, evaluate_generator, load_reference
from gantrain.engine.metrics.extractor import Extractor, ensure_extractor
from gantrain.engine.metrics.reference import DatasetSpec, parse_dataset, spec_from_config

__all__ = ["METRIC_KEYS", "DatasetSpec", "Evaluator", "Extractor", "MetricReport", "ensure_extractor",
           "evaluate_generator", "load_reference", "parse_dataset", "spec_from_config"]
