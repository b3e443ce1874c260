"""Runs inside the SAELens virtualenv, which holds sae-dashboard==0.8.0 (scripts/install_saelens.sh),
called by test_neuronpedia.py as ``python neuronpedia_worker.py FOLDER``.

Reads every ``FOLDER/batch-*.json`` back with SAEDashboard's own data classes
(``NeuronpediaDashboardBatch(**data)``, which builds each feature and activation from its dict and
fails on a field name it does not define) and checks that

- ``to_dict()`` gives the file's contents back exactly (no field of ours dropped or renamed, none
  of theirs missing), and
- every value has the type the data classes' constructors annotate (a float field takes any JSON
  number; lists element by element).

Prints one JSON line: ``{"batches": n, "features": n, "activations": n, "problems": [...]}``.
"""
from __future__ import annotations

import inspect
import json
import sys
import typing
from pathlib import Path
from types import NoneType, UnionType

from sae_dashboard.neuronpedia.neuronpedia_dashboard import (
    NeuronpediaDashboardActivation,
    NeuronpediaDashboardBatch,
    NeuronpediaDashboardFeature,
)


def annotations(cls: type) -> dict[str, object]:
    return {name: p.annotation for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}


def conforms(value: object, annotation: object) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is typing.Any:
        return True
    if annotation is NoneType:
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation in (int, str):
        return isinstance(value, annotation) and not isinstance(value, bool)
    if origin in (typing.Union, UnionType):
        return any(conforms(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    raise TypeError(f"unhandled annotation {annotation!r}")


def check(data: dict, cls: type, where: str, problems: list[str]) -> None:
    expected = annotations(cls)
    for name, value in data.items():
        if name not in expected:
            problems.append(f"{where}: {name} is not a field of {cls.__name__}")
        elif not conforms(value, expected[name]):
            problems.append(f"{where}: {name}={value!r:.80} is not {expected[name]}")


def main(folder: Path) -> None:
    problems: list[str] = []
    counts = {"batches": 0, "features": 0, "activations": 0}
    for path in sorted(folder.glob("batch-*.json")):
        data = json.loads(path.read_text())
        batch = NeuronpediaDashboardBatch(**data)
        if batch.to_dict() != data:
            problems.append(f"{path.name}: to_dict() differs from the file")
        check({k: v for k, v in data.items() if k != "features"}, NeuronpediaDashboardBatch, path.name, problems)
        for feature in data["features"]:
            where = f"{path.name} feature {feature.get('feature_index')}"
            check(feature, NeuronpediaDashboardFeature, where, problems)
            for activation in feature["activations"]:
                check(activation, NeuronpediaDashboardActivation, where, problems)
            counts["activations"] += len(feature["activations"])
        counts["batches"] += 1
        counts["features"] += len(data["features"])
    print(json.dumps({**counts, "problems": problems}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
