"""Issue 31's experiments: what makes ``c_abstractor`` and ``tokenpacker`` lose the objects' attributes on the mini
world. One seed per variant, each a normal run directory (``bench report`` reads them, but puts the variants of
one connector in one row: read them with this script).

    python benchmarks/connector_diagnosis.py --out sweeps/diagnosis [--seed 0] VARIANT [VARIANT ...]
    python benchmarks/connector_diagnosis.py --list

A variant is a connector spec (name and settings) plus overrides of the ``mini`` recipe's two stages (the
connector's own learning rate, weight decay, ...), named in ``VARIANTS`` below. Each prints one JSON line: test
accuracy, colour / shape / size / count / position, the last 100 steps' mean loss of each stage, and the mean norm
of a visual token on 64 test images beside the mean norm of the LLM's text embeddings. A finished variant (its
``results.json``, or the ``results.json.gz`` that ``benchmarks/keep_sweep_record.py`` keeps, exists) is read back,
not re-run; docs/mini-world.md's issue-31 table is ``python benchmarks/connector_diagnosis.py --out
sweeps/diagnosis`` with its variants, read from the kept records (token norms need the weights, which are not kept).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from bench.data.world import World, WorldConfig
from bench.report.tables import load_runs, results_files
from bench.run.job import run
from bench.train.recipes import RECIPES
from bench.train.settings import RunConfig
from connector_zoo.model.vlm import VLM

MINI = RECIPES["mini"]


def stages(s1: dict[str, Any] | None = None, s2: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [dict(MINI[0], **(s1 or {})), dict(MINI[1], **(s2 or {}))]


#: name -> (connector spec, stages). The recipe's own rates: 2e-3 for connector and LLM in both stages.
VARIANTS: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
    "linear": ({"name": "linear"}, stages()),
    "linear/s2-conn-lr2e-5": ({"name": "linear"}, stages(None, {"connector_lr": 2e-5})),
    "linear/no-stage1": ({"name": "linear"}, stages({"steps": 0})),
    "ldpv2": ({"name": "ldpv2"}, stages()),
    "mlp2x_gelu": ({"name": "mlp2x_gelu"}, stages()),
    "ldpv2/no-stage1": ({"name": "ldpv2"}, stages({"steps": 0})),
    "c_abstractor": ({"name": "c_abstractor"}, stages()),
    "c_abstractor/no-pos": ({"name": "c_abstractor", "pos_emb": False}, stages()),
    "c_abstractor/depth0": ({"name": "c_abstractor", "depth": 0}, stages()),
    "c_abstractor/depth1": ({"name": "c_abstractor", "depth": 1}, stages()),
    "c_abstractor/hidden1024": ({"name": "c_abstractor", "hidden_size": 1024}, stages()),
    "c_abstractor/conn-lr2e-4": ({"name": "c_abstractor"}, stages({"lr": 2e-4}, {"connector_lr": 2e-4})),
    "c_abstractor/wd0.01": ({"name": "c_abstractor"}, stages({"weight_decay": 0.01}, {"weight_decay": 0.01})),
    "c_abstractor/no-stage1": ({"name": "c_abstractor"}, stages({"steps": 0})),
    "c_abstractor/stage1-lr2e-4": ({"name": "c_abstractor"}, stages({"lr": 2e-4})),
    # the papers' stage-2 rate for the connector (LLaVA-1.5, Honeybee, TokenPacker: 2e-5), the world LLM at 2e-3
    "c_abstractor/s2-conn-lr2e-5": ({"name": "c_abstractor"}, stages(None, {"connector_lr": 2e-5})),
    "c_abstractor/honeybee-rates": ({"name": "c_abstractor"}, stages({"lr": 1e-4}, {"connector_lr": 2e-5})),
    # the connector as initialised, never trained (no stage 1; stage 2 trains the LLM, the connector at 1e-9)
    "c_abstractor/frozen": ({"name": "c_abstractor"}, stages({"steps": 0}, {"connector_lr": 1e-9})),
    "tokenpacker": ({"name": "tokenpacker"}, stages()),
    "tokenpacker/no-stage1": ({"name": "tokenpacker"}, stages({"steps": 0})),
    "tokenpacker/stage1-lr2e-4": ({"name": "tokenpacker"}, stages({"lr": 2e-4})),
    "tokenpacker/s2-conn-lr2e-5": ({"name": "tokenpacker"}, stages(None, {"connector_lr": 2e-5})),
    "tokenpacker/tokenpacker-rates": ({"name": "tokenpacker"}, stages({"lr": 1e-3}, {"connector_lr": 2e-5})),
    "tokenpacker/frozen": ({"name": "tokenpacker"}, stages({"steps": 0}, {"connector_lr": 1e-9})),
    "tokenpacker/conn-lr2e-4": ({"name": "tokenpacker"}, stages({"lr": 2e-4}, {"connector_lr": 2e-4})),
    "tokenpacker/embed1024": ({"name": "tokenpacker", "embed_dim": 1024, "num_heads": 8}, stages()),
}


def token_norms(run_dir: Path, world: World) -> dict[str, float | None]:
    if not (run_dir / "trainable.safetensors").exists():  # a kept record (sweeps/diagnosis): results only
        return {"token_norm": None, "text_norm": None}
    vlm = VLM.load(run_dir).eval()
    images = [world.image("test", i) for i in range(64)]
    with torch.no_grad():
        feats = vlm.encoder(vlm.encoder.preprocess(images))
        out = vlm.connector(feats)
        tokens = out.tokens[out.mask].float()
    text = vlm.llm.model.get_input_embeddings().weight.float()
    return {
        "token_norm": round(tokens.norm(dim=-1).mean().item(), 3),
        "text_norm": round(text.norm(dim=-1).mean().item(), 3),
    }


def summary(name: str, run_dir: Path, world: World) -> dict[str, Any]:
    res = load_runs([run_dir])[0]  # results.json, or the results.json.gz a kept record holds
    test = res["metrics"]["test"]["accuracy"]
    per = test["per_type"]
    losses = [round(statistics.mean(x["loss"] for x in h[-100:]), 3) if h else None for h in res["loss_history"]]
    return {
        "variant": name,
        "test": round(100 * test["exact_match"], 1),
        **{k: round(100 * per[k], 1) for k in ("colour", "shape", "size", "count", "position")},
        "loss_last100": losses,
        **token_norms(run_dir, world),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="*")
    ap.add_argument("--out", type=Path, default=Path("sweeps/diagnosis"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list or not args.variants:
        print("\n".join(VARIANTS))
        return
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; available: {', '.join(VARIANTS)}")
    world = None
    for name in args.variants:
        spec, stage_list = VARIANTS[name]
        run_dir = args.out / f"{name.replace('/', '--')}--s{args.seed}"
        if not results_files(run_dir):
            cfg = RunConfig(
                connector=dict(spec), llm={"name": "tinyllama"}, recipe="mini", stages=stage_list, seed=args.seed
            )
            run(cfg, run_dir, log=lambda message: None)
        world = world or World(WorldConfig(), progress=False)
        line = summary(name, run_dir, world)
        print(json.dumps(line), flush=True)
        with open(args.out / "summary.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
