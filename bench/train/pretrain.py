"""Miniature backbones pretrained inside the mini world, so that connectors train as in LLaVA stage 1.

- Encoders: each family's own architecture (tiny preset) trained contrastively on the world's image-caption pairs
  against a small text transformer: CLIP's softmax loss for ``clip`` and ``eva-vit-g``, SigLIP's sigmoid loss for
  ``siglip`` (open_clip's ``ClipLoss`` / ``SigLipLoss``). The image side is the model's own pooled embedding (CLS
  after the final norm, or SigLIP's attention-pooling probe), so every layer, the probe included, learns.
- LLMs: bench/train/world_llm.py (each backend's architecture trained on the world's text, without images).

Both are written with ``save_pretrained`` (timm's ``save_for_hf`` for EVA) into the world's cache directory and loaded
back through the same code path as real checkpoints: by local directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from bench.data.world import COLOURS, SHAPES, SIZES, World, WorldConfig, patch_labels
from bench.train.world_llm import llm_dir_name
from connector_zoo.io import kill_point, materialize, progress
from encoders import ENCODERS

# the world encoders' recipe (docs/mini-world.md, "Where the world's ceiling is"): contrastive on captions plus, at
# 4x its weight, the dense objective on object patches (dense_loss); with contrastive alone (240 steps at 1e-3, the
# recipe before December) single patch tokens said the shape under them for 46 % of object patches and the VLM
# answered shape questions at the blind level
ENCODER_STEPS = 600
ENCODER_DENSE = 4.0
ENCODER_LR = 3e-3
ENCODER_POSITION = 0.0  # off: see position_loss
#: the world LLM levels whose encoder is pretrained on recoloured images unless the run says otherwise
#: (``--world-encoder-recolour``; pretrain_encoder's ``recolour``): the pretrained level, since December 7
RECOLOURED_LEVELS = ("smollm2",)
#: the world LLM levels whose encoder pretrains longer than ENCODER_STEPS unless the run says (``--pretrain-steps``):
#: the pretrained level's recoloured encoder at 2,000 steps reads the shape of an object whose colour-shape pair the
#: world holds out at 89 % (a linear probe; 62 % at 600 steps, small objects 79 against 38; docs/pretrained-world.md)
LEVEL_ENCODER_STEPS = {"smollm2": 2000}


class TextTower(nn.Module):
    """A small word-level text transformer for contrastive pretraining (discarded afterwards)."""

    def __init__(self, vocab: dict[str, int], width: int, out_dim: int, max_len: int = 48):
        super().__init__()
        self.vocab, self.max_len = vocab, max_len
        self.embed = nn.Embedding(len(vocab) + 1, width, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, max_len, width))
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.proj = nn.Linear(width, out_dim)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        for i, t in enumerate(texts):
            words = [self.vocab.get(w, 0) for w in t.replace(",", " ,").replace(".", " .").split()][: self.max_len]
            ids[i, : len(words)] = torch.tensor(words)
        return ids

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenize(texts)
        pad = ids == 0
        x = self.encoder(self.embed(ids) + self.pos, src_key_padding_mask=pad)
        x = (x * ~pad[..., None]).sum(1) / (~pad).sum(1, keepdim=True).clamp(min=1)
        return self.proj(x)


def word_vocab(texts: list[str]) -> dict[str, int]:
    words = sorted({w for t in texts for w in t.replace(",", " ,").replace(".", " .").split()})
    return {w: i + 1 for i, w in enumerate(words)}


def encoder_dir_name(
    family: str,
    steps: int = ENCODER_STEPS,
    batch_size: int = 256,
    seed: int = 0,
    dense: float = ENCODER_DENSE,
    lr: float = ENCODER_LR,
    position: float = ENCODER_POSITION,
    input_px: int | None = None,
    recolour: bool = False,
) -> str:
    """The directory name of a world encoder: its readable settings and a digest of every setting of its recipe."""
    recipe = {
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "dense": dense,
        "lr": lr,
        "objective": "contrastive" + ("+dense-on-object-patches" if dense else ""),
        "schedule": "onecycle-0.1",
    }
    if dense:  # both objectives read from pooled_features since December 1 (one forward where the family can):
        recipe["forward"] = "pooled_features"  # other float bits than the two calls before, so another directory
        if family in ("eva-vit-g", "fused"):  # these two run one pass since December 2 (the others since December 1)
            recipe["forward"] = "pooled_features-one-pass"
    if position:  # only when used, so that the recipes before it keep their names
        recipe["position"] = position
    if input_px:  # likewise: an input smaller than the world's images (whole images resized + native crops)
        recipe["input_px"] = input_px
    if recolour:  # likewise: every image's colours permuted at random each step (recolour_batch)
        recipe["recolour"] = True
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    readable = (f"-dense{dense:g}" if dense else "") + (f"-pos{position:g}" if position else "")
    readable += (f"-px{input_px}" if input_px else "") + ("-recolour" if recolour else "")
    return f"encoder-{family}-s{steps}-b{batch_size}-seed{seed}{readable}-{digest}"


def pretrain_encoder(
    family: str,
    world: World,
    steps: int = ENCODER_STEPS,
    batch_size: int = 256,
    seed: int = 0,
    dense: float = ENCODER_DENSE,
    lr: float = ENCODER_LR,
    position: float = ENCODER_POSITION,
    input_px: int | None = None,
    recolour: bool = False,
    log=print,
) -> Path:
    """The world's ``family`` encoder directory, trained on first use. ``dense`` > 0 adds, with that weight, a dense
    objective on the selected layer's patch tokens: a linear head per patch predicts the colour, shape and size of
    the object covering it (or background), so that each patch token says what is under it. The directory is named
    by every setting of the recipe (a digest of them), so a changed recipe never reuses an encoder built by another.

    ``input_px`` (smaller than the world's images; AnyRes's setting): the encoder takes that many pixels a side, and
    each step it sees the batch's images resized to it (both objectives) and, for the dense objective, a square of
    that side cut from each image at its own resolution (what an AnyRes tile shows), so both views are in its
    training distribution.

    ``recolour``: each step, each image's objects take other colours (one random permutation of the palette per image,
    applied to its pixels, its caption's colour words and its dense colour labels alike; ``recolour_batch``), so the
    encoder sees every colour-shape pair, also the ones the world holds out of its training split for the
    compositional test. A pretrained CLIP has seen red circles too; what the compositional split then tests is
    whether the connector and the LLM, trained on the world's training split only, carry a pair they never saw."""
    cls = ENCODERS.get(family)
    world_px = world.cfg.image_size
    if input_px == world_px:
        input_px = None  # the default: one name for one encoder
    if input_px is not None and (input_px > world_px or input_px % 8):
        raise ValueError(
            f"world encoder input {input_px} px: a multiple of 8 no larger than the world's {world_px}-px images"
        )
    name = encoder_dir_name(family, steps, batch_size, seed, dense, lr, position, input_px, recolour)
    out = world.dir / "backbones" / name

    def build(tmp: Path) -> None:
        from open_clip.loss import ClipLoss, SigLipLoss

        log(
            f"world encoder: pretraining the {family} tower on the world's images, {steps} steps (once per world and "
            "recipe; a few minutes on 2 CPU cores)"
        )

        size = input_px or world_px  # the tiny preset at that resolution: 8-px patches, (size / 8)^2 of them
        enc = cls.from_checkpoint("tiny" if size == 64 else f"tiny@{size}", frozen=False)  # may build the preset
        # first, which draws random numbers
        torch.manual_seed(seed)  # so seed after it: a build after a kill starts from the same state as any other
        rng = random.Random(seed)
        enc.train()
        dim = enc.info.hidden_size
        records, images = world.records("train"), world.images("train")
        text = TextTower(word_vocab([r["caption"] for r in records]), 64, dim)
        img_proj = nn.Linear(dim, dim)
        heads, labels = nn.ModuleList(), None  # the dense objective's (built only when used: dense=0 draws no extra
        if dense:  # random numbers, so that recipe's encoder is byte for byte the one built before the option existed)
            heads.extend([nn.Linear(dim, len(COLOURS) + 1), nn.Linear(dim, len(SHAPES)), nn.Linear(dim, len(SIZES))])
            patch = enc.info.image_size // enc.info.grid[0]
            objects = world.cfg.object_scale
            labels = torch.from_numpy(np.stack([patch_labels(r, size, patch, objects, world_px) for r in records]))
        where = nn.ModuleList()  # the position objective's row and column heads (built only when used, as above)
        if position:
            where.extend([nn.Linear(dim, enc.info.grid[0]), nn.Linear(dim, enc.info.grid[1])])
        sigmoid = family == "siglip"
        loss_fn = SigLipLoss() if sigmoid else ClipLoss()
        scale = nn.Parameter(torch.tensor(math.log(10.0 if sigmoid else 1 / 0.07)))
        bias = nn.Parameter(torch.tensor(-10.0))
        params = [*enc.parameters(), *text.parameters(), *img_proj.parameters(), *heads.parameters()]
        params += [*where.parameters(), scale, bias]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
        batch = min(batch_size, len(records))
        objective = (
            f"contrastive, {'sigmoid' if sigmoid else 'softmax'}"
            + (", + dense" if dense else "")
            + (", + position" if position else "")
        )
        for step in progress(range(steps), desc=f"pretrain {family} ({objective})"):
            kill_point(f"pretrain-encoder-{family}:{step}")
            idx = rng.sample(range(len(records)), batch)
            pixels, captions = np.asarray(images[idx]), [records[i]["caption"] for i in idx]
            dense_labels = labels[idx] if labels is not None else None
            corners, crop_labels = None, None
            if dense and input_px:  # squares at the images' own resolution: AnyRes's tiles (cut from the pixels
                corners = [(rng.randrange(world_px - size + 1), rng.randrange(world_px - size + 1)) for _ in idx]
                crop_labels = torch.from_numpy(  # as recoloured below, so that a tile keeps its image's colours)
                    np.stack(
                        [
                            patch_labels(records[i], size, patch, objects, world_px, (t, c, size))
                            for i, (t, c) in zip(idx, corners)
                        ]
                    )
                )
            if recolour:
                pixels, captions, dense_labels, crop_labels = recolour_batch(
                    pixels, captions, dense_labels, rng, crop_labels
                )
            px = enc.preprocess([Image.fromarray(p) for p in pixels])
            pooled, features = enc.pooled_features(px) if dense or position else (enc.pooled(px), None)  # one forward
            img = nn.functional.normalize(img_proj(pooled), dim=-1)
            txt = nn.functional.normalize(text(captions), dim=-1)
            loss = loss_fn(img, txt, scale.exp(), bias) if sigmoid else loss_fn(img, txt, scale.exp())
            if dense:
                loss = loss + dense * dense_loss(heads, features.patches, dense_labels.flatten(1, 2))
            if corners is not None:
                crops = [Image.fromarray(pixels[j][t : t + size, c : c + size]) for j, (t, c) in enumerate(corners)]
                crop_patches = enc(enc.preprocess(crops)).patches
                loss = loss + dense * dense_loss(heads, crop_patches, crop_labels.flatten(1, 2))
            if position:
                loss = loss + position * position_loss(where, features.patches)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        enc.save_checkpoint(tmp)

    return materialize(out, build, verified=True)  # checked at every load: it decides every later number


def recolour_batch(
    pixels: np.ndarray,
    captions: list[str],
    labels: torch.Tensor | None,
    rng: random.Random,
    crop_labels: torch.Tensor | None = None,
) -> tuple[np.ndarray, list[str], torch.Tensor | None, torch.Tensor | None]:
    """The batch with each image's colours permuted: one random permutation of ``COLOURS`` per image (drawn from
    ``rng``), applied to its pixels (the world draws every object in an exact palette colour on the background,
    without anti-aliasing, so a pixel's colour names its object's), to the colour words of its caption and to the
    colour channel of its ``patch_labels`` (class 0, background, stays), and of ``crop_labels`` (the labels of a
    square cut from each image, ``--world-encoder-px``'s tiles) by the same image's permutation.
    ``pixels``: (B, H, W, 3) uint8."""
    names, palette = list(COLOURS), np.array(list(COLOURS.values()), np.int64)
    code = lambda rgb: (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # noqa: E731
    codes = code(palette)
    flat = code(pixels.astype(np.int64))
    which = np.full(flat.shape, -1)
    for k, c in enumerate(codes):
        which[flat == c] = k
    out, texts = pixels.copy(), []
    new_labels, new_crops = (None if t is None else t.clone() for t in (labels, crop_labels))
    for b in range(len(pixels)):
        perm = list(range(len(names)))
        rng.shuffle(perm)
        painted = which[b] >= 0
        out[b][painted] = palette[np.array(perm)[which[b][painted]]]
        swap = {names[k]: names[perm[k]] for k in range(len(names))}
        texts.append(" ".join(swap.get(w, w) for w in captions[b].split(" ")))
        lut = torch.tensor([0] + [p + 1 for p in perm])
        for new, old in ((new_labels, labels), (new_crops, crop_labels)):
            if new is not None:
                new[b, ..., 0] = lut[old[b, ..., 0]]
    return out, texts, new_labels, new_crops


def dense_loss(heads: nn.ModuleList, patches: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The dense objective on the selected layer's patch tokens (B, N, D) against ``patch_labels`` (B, N, 3): the
    colour head over every patch (class 0 = background, so it also learns where objects are), the shape and size
    heads over the patches an object covers only. Over all patches, background (about 80 % of them) dominated the
    shape and size terms: with this objective alone for 600 steps a per-token linear probe read shape from 73 % of the
    object patches, against 89 % with the loss on object patches (docs/mini-world.md, "Where the world's ceiling
    is")."""
    colour = nn.functional.cross_entropy(heads[0](patches).flatten(0, 1), target[..., 0].flatten())
    on_object = target[..., 0] > 0
    if not on_object.any():
        return colour / 3
    rest = sum(nn.functional.cross_entropy(heads[k](patches[on_object]), target[..., k][on_object] - 1) for k in (1, 2))
    return (colour + rest) / 3


def position_loss(heads: nn.ModuleList, patches: torch.Tensor) -> torch.Tensor:
    """The position objective on the selected layer's patch tokens (B, N, D), N = rows x columns in raster order:
    two linear heads predict each token's own grid row and column (cross-entropy, every token). The tower's position
    embedding puts this at its input; without the objective a per-token linear probe read the row from 57 % and the
    column from 54 % of the object tokens at the default layer, and position and relation questions, which need
    where the attended object is, were the VLM's weakest (docs/mini-world.md, "Where the world's ceiling is")."""
    rows, cols = heads[0].out_features, heads[1].out_features
    index = torch.arange(rows * cols, device=patches.device)
    row, col = (index // cols).expand(patches.shape[0], -1), (index % cols).expand(patches.shape[0], -1)
    ce = nn.functional.cross_entropy
    return (ce(heads[0](patches).flatten(0, 1), row.flatten()) + ce(heads[1](patches).flatten(0, 1), col.flatten())) / 2


def world_backbones(cfg, llm_precision: str | None = None) -> dict[str, str] | None:
    """For a mini-world run (a RunConfig), what its backbones are, computed without building anything: the world's
    key and the directory names of the encoder and LLM that ``build_model`` pretrains (or the checkpoints the config
    names). Recorded in results.json; ``bench sweep`` re-runs a recorded cell whose backbones differ from these.
    ``llm_precision``: a pretrained level's world LLM as fine-tuned at that precision instead of this machine's."""
    if cfg.data.get("kind", "world") != "world":
        return None
    pre = cfg.data.get("pretrain", {})
    world = WorldConfig(**cfg.data.get("world", {}))
    encoder = steps(pre, "encoder")
    if encoder.get("input_px") == world.image_size:  # (as pretrain_encoder names it)
        del encoder["input_px"]
    return {
        "world": world.key(),
        "encoder": cfg.encoder.get("checkpoint") or encoder_dir_name(cfg.encoder["name"], **encoder),
        "llm": cfg.llm.get("checkpoint") or llm_dir_name(cfg.llm["name"], **steps(pre, "llm"), precision=llm_precision),
    }


def steps(pretrain: dict, backbone: str) -> dict:
    """The ``pretrain_encoder`` / ``pretrain_llm`` keywords a run config's ``data.pretrain`` sets for ``backbone``
    ("encoder" or "llm"): its ``steps`` override (else, for the encoder, its level's LEVEL_ENCODER_STEPS), and for the
    LLM its ``llm_level``."""
    key = f"{backbone}_steps"
    level = pretrain.get("llm_level", "small")
    out = {"steps": pretrain[key]} if key in pretrain else {}
    if backbone == "encoder" and key not in pretrain and level in LEVEL_ENCODER_STEPS:
        out["steps"] = LEVEL_ENCODER_STEPS[level]
    if backbone == "encoder" and pretrain.get("encoder_px"):
        out["input_px"] = pretrain["encoder_px"]
    if backbone == "encoder" and pretrain.get("encoder_recolour", level in RECOLOURED_LEVELS):
        out["recolour"] = True
    if backbone == "llm" and pretrain.get("llm_level", "small") != "small":
        out["level"] = pretrain["llm_level"]
    return out
