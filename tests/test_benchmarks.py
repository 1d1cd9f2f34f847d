"""The probes the README's diagnoses rest on (benchmarks/connector_probe.py) read what is there and nothing else."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def load(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_connector_probe_reads_a_linear_attribute_and_not_noise():
    """Three colours, each raising a feature of its own among 32 noise dimensions, are read back on held-out
    samples; the same labels against features that do not depend on them stay near chance (1/3)."""
    probe = load("connector_probe").probe
    g = torch.Generator().manual_seed(0)
    labels = [["red", "green", "blue"][i % 3] for i in range(600)]
    code = torch.tensor([["red", "green", "blue"].index(v) for v in labels])
    noise = torch.randn(600, 32, generator=g)
    coded = noise.clone()
    coded[torch.arange(600), 5 + code] += 4  # each colour raises a feature of its own
    assert probe(coded[:400], labels[:400], coded[400:], labels[400:], steps=200) > 0.95
    assert probe(noise[:400], labels[:400], noise[400:], labels[400:], steps=200) < 0.5
