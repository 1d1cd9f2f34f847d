"""What a trained connector's tokens still say about the objects: a linear probe on its output, before and after
training.

    python benchmarks/connector_probe.py RUN_DIR [RUN_DIR ...] [--train 3000] [--steps 300] [--norms-only]

For each mini-world run (a ``bench run`` or sweep-cell directory), the connector's visual tokens for the images that
hold a single object are flattened and standardised, and one linear classifier per attribute (colour, shape, size) is
trained on the training split's single-object images (Adam, ``--steps``) and scored on the test split's. Measured at
three points: the connector untrained (the same architecture and settings, freshly initialised with the run's seed),
after stage 1 (``stage1/checkpoint-last``, when kept) and as the run ended. Also printed: the mean norm of a visual
token against the mean norm of the LLM's text embeddings, and the probe on the encoder's patch features (what the
connector receives). An attribute the probe reads from the encoder and not from the trained connector's tokens was
lost in the connector's training; one that the tokens still carry and the VLM still misses is lost in the LLM.

Two probes per point: ``probe`` (one weight per token position, on the flattened tokens) and ``shared_probe`` (one
classifier shared by all tokens, logits pooled over them): an attribute can stay readable per position while its
code has come to depend on where the object is, which the shared probe shows and an LLM reading every visual token
with the same weights suffers from (issue 31: c_abstractor's trained colour, 84 % flattened, 34 % shared). ``--inside``
adds the shared probe at every module of the trained connector, in call order: where inside it an attribute is lost.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.data.world import World, WorldConfig
from bench.train.settings import RunConfig
from connector_zoo.model.vlm import VLM
from connectors import build_connector

ATTRIBUTES = ("colour", "shape", "size")


def single_objects(world: World, split: str, n: int | None) -> tuple[list[int], dict[str, list[str]]]:
    """Indices of the split's single-object scenes (the first ``n``) and each attribute's value per scene."""
    recs = world.records(split)
    idx = [i for i, r in enumerate(recs) if len(r["objects"]) == 1][:n]
    return idx, {a: [recs[i]["objects"][0][a] for i in idx] for a in ATTRIBUTES}


def probe(train_x: torch.Tensor, train_y: list[str], test_x: torch.Tensor, test_y: list[str], steps: int) -> float:
    """Test accuracy of a linear classifier trained on standardised features (seed 0). Features (n, F): one
    classifier on the flattened tokens (a weight per position). Features (n, T, F): one classifier *shared by every
    token*, its logits pooled over the tokens by log-sum-exp: what an LLM reading any token the same way can get."""
    classes = sorted(set(train_y) | set(test_y))
    y_tr = torch.tensor([classes.index(v) for v in train_y])
    y_te = torch.tensor([classes.index(v) for v in test_y])
    flat = train_x.reshape(-1, train_x.shape[-1])
    mean, std = flat.mean(0), flat.std(0) + 1e-6
    x_tr, x_te = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(0)
    lin = torch.nn.Linear(x_tr.shape[-1], len(classes))
    logits = (lambda x: lin(x)) if x_tr.dim() == 2 else (lambda x: torch.logsumexp(lin(x), dim=1))  # noqa: E731
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(logits(x_tr), y_tr).backward()
        opt.step()
    with torch.no_grad():
        return (logits(x_te).argmax(1) == y_te).float().mean().item()


@torch.no_grad()
def features(vlm: VLM, world: World, split: str, idx: list[int]):
    """The encoder's features of the split's images ``idx`` (chunks of 256, joined)."""
    from encoders.base import VisionFeatures

    enc = vlm.encoder
    return VisionFeatures.stack(
        [enc(enc.preprocess([world.image(split, j) for j in idx[s : s + 256]])) for s in range(0, len(idx), 256)]
    )


def inside(conn, features, depth: int = 3) -> dict[str, torch.Tensor]:
    """What each of the connector's modules (names of up to ``depth`` parts) outputs on ``features``, as (B, T, C)
    tokens in call order, and the connector's own ``tokens`` last. Feature maps (B, C, h, w) become their pixels;
    an output whose first axis folds regions into the batch (B * G, ...) is unfolded; other outputs are left out."""
    B, caught = features.batch_size, {}

    def hook(name):
        def catch(module, args, out):
            t = out[0] if isinstance(out, tuple) else out
            if isinstance(t, torch.Tensor) and t.dim() in (3, 4) and t.shape[0] % B == 0:
                t = t.flatten(2).transpose(1, 2) if t.dim() == 4 else t
                caught[name] = t.reshape(B, -1, t.shape[-1]).float()

        return catch

    handles = [m.register_forward_hook(hook(n)) for n, m in conn.named_modules() if n and n.count(".") < depth]
    try:
        with torch.no_grad():
            caught["tokens"] = conn.eval()(features).tokens.float()
    finally:
        for h in handles:
            h.remove()
    return caught


def measure_inside(conn, train: tuple, test: tuple, steps: int) -> list[dict]:
    """The shared probe and the mean token norm at each module's output (``inside``): where an attribute is lost."""
    a, b = inside(conn, train[0]), inside(conn, test[0])
    return [
        {
            "module": name,
            "token_norm": round(b[name].norm(dim=-1).mean().item(), 2),
            "shared_probe": {k: round(probe(a[name], train[1][k], b[name], test[1][k], steps), 3) for k in ATTRIBUTES},
        }
        for name in a
    ]


def measure(conn, train: tuple, test: tuple, steps: int) -> dict:
    """The mean norm of ``conn``'s test tokens and the probe's accuracy per attribute on its flattened tokens;
    ``train`` and ``test`` are (encoder features, {attribute: values})."""
    with torch.no_grad():
        t_tr, t_te = conn.eval()(train[0]).tokens.float(), conn(test[0]).tokens.float()
    norms = {
        "token_norm": round(t_te.norm(dim=-1).mean().item(), 2),
        # the part of a token that says something: its distance from the mean token (a large shared offset leaves
        # the LLM's RMSNorm little of the rest; the standardised probes below do not see this)
        "centred_norm": round((t_te - t_te.flatten(0, 1).mean(0)).norm(dim=-1).mean().item(), 2),
    }
    if not steps:  # --norms-only
        return norms
    acc = {a: round(probe(t_tr.flatten(1), train[1][a], t_te.flatten(1), test[1][a], steps), 3) for a in ATTRIBUTES}
    shared = {a: round(probe(t_tr, train[1][a], t_te, test[1][a], steps), 3) for a in ATTRIBUTES}
    return {**norms, "probe": acc, "shared_probe": shared}


def probe_run(run_dir: Path, n_train: int, steps: int, modules: bool = False) -> None:
    """Print the encoder's probe and the connector's at each point of one run (JSON lines)."""
    cfg = RunConfig.from_file(run_dir / "config.json")
    world = World(WorldConfig(**cfg.data.get("world", {})), progress=False)
    vlm = VLM.load(run_dir).eval()
    tr_idx, tr_y = single_objects(world, "train", n_train)
    te_idx, te_y = single_objects(world, "test", None)
    train, test = (features(vlm, world, "train", tr_idx), tr_y), (features(vlm, world, "test", te_idx), te_y)
    encoder = {
        a: round(probe(train[0].patches.flatten(1), tr_y[a], test[0].patches.flatten(1), te_y[a], steps), 3)
        for a in ATTRIBUTES
        if steps
    }
    encoder_shared = {
        a: round(probe(train[0].patches, tr_y[a], test[0].patches, te_y[a], steps), 3) for a in ATTRIBUTES if steps
    }
    text_norm = round(vlm.llm.model.get_input_embeddings().weight.float().norm(dim=-1).mean().item(), 2)
    head = {
        "run": str(run_dir),
        "connector": vlm.connector.spec["name"],
        "probe_images": len(tr_idx),
        "test_images": len(te_idx),
        "encoder_patches": encoder,
        "encoder_patches_shared": encoder_shared,
        "text_embedding_norm": text_norm,
        "encoder_patch_norm": round(test[0].patches.float().norm(dim=-1).mean().item(), 2),
    }
    print(json.dumps(head))
    spec = dict(vlm.connector.spec)
    torch.manual_seed(cfg.seed)
    untrained = build_connector(spec.pop("name"), vlm.connector.in_dim, vlm.connector.out_dim, **spec)
    points = {"untrained": measure(untrained, train, test, steps)}
    trained = measure(vlm.connector, train, test, steps)
    stage1 = run_dir / "stage1" / "checkpoint-last"
    if (stage1 / "trainable.safetensors").exists():
        vlm.load_connector(stage1)  # the run's own loader, checked against the checkpoint's manifest
        points["after stage 1"] = measure(vlm.connector, train, test, steps)
    points["trained"] = trained
    for name, point in points.items():
        print(json.dumps({"point": name, **point}), flush=True)
    if modules:  # the trained connector, module by module
        vlm.load_connector(run_dir)
        for line in measure_inside(vlm.connector, train, test, steps):
            print(json.dumps({"point": "trained, inside", **line}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--train", type=int, default=3000, help="single-object training images for the probe")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--inside", action="store_true", help="also probe each module of the trained connector")
    ap.add_argument("--norms-only", action="store_true", help="no probe: the token norms at each point (seconds)")
    args = ap.parse_args()
    for run_dir in args.runs:
        probe_run(run_dir, args.train, 0 if args.norms_only else args.steps, args.inside)


if __name__ == "__main__":
    main()
