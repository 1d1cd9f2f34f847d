"""Data: the published formats, the mini world, and the collator.

A :class:`Dataset` is a list of :class:`Sample` (an id, a conversation in the chat-message form, the index of its
image in the dataset's :class:`ImageTable` or None) plus that table. Loaders:

- ``llava_json(json_path, image_folder)``: LLaVA JSON (LLaVA-CC3M-Pretrain-595K ``chat.json``,
  ``blip_laion_cc_sbu_558k.json``, ``llava_v1_5_mix665k.json``): ``{"id", "image", "conversations": [{"from":
  "human"|"gpt", "value"}]}`` with ``<image>`` in the first human turn; entries without ``image`` are text-only.
- ``hf_messages(path)``: a Hugging Face dataset saved locally (``save_to_disk`` or parquet/json files) in the
  ``messages`` + ``images`` form of ``HuggingFaceH4/llava-instruct-mix-vsft``.
- ``world_dataset(world, split)``: the mini world's questions (and captions).

A bad sample (missing or unreadable image, no ``<image>`` where one is needed, a malformed record, a sequence that
cannot fit) is skipped and recorded with its id and reason in ``dataset.skipped`` (the run's report), or raises
:class:`BadSample` under ``strict``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.data.images import ArrayImages, BadSample, FileImages, HFImages, ImageTable
from connector_zoo.settings import SettingError
from llms.base import IMAGE_TOKEN

__all__ = ["BadSample", "Dataset", "ImageTable", "Sample", "hf_messages", "llava_json", "world_dataset"]

CAPTION_PROMPT = "Describe the image briefly."


@dataclass
class Sample:
    id: str
    messages: list[dict[str, str]]
    image: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Dataset:
    name: str
    samples: list[Sample]
    images: ImageTable
    skipped: list[dict[str, str]] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set, repr=False)

    def skip(self, sample_id: str, reason: str, strict: bool) -> None:
        """Record a bad sample once (epochs meet it again), or raise under ``strict``."""
        if strict:
            raise BadSample(f"{self.name}: sample {sample_id!r}: {reason} (drop --strict to skip such samples)")
        if str(sample_id) not in self._seen:
            self._seen.add(str(sample_id))
            self.skipped.append({"id": str(sample_id), "reason": reason})

    def split(self, held_out: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """(train, held-out) by a seeded permutation; both share the image table."""
        order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(seed)).tolist()
        n = max(1, int(round(held_out * len(order))))
        pick = lambda idx: [self.samples[i] for i in sorted(idx)]  # noqa: E731
        return (
            Dataset(self.name, pick(order[n:]), self.images, self.skipped, self._seen),
            Dataset(self.name + ":heldout", pick(order[:n]), self.images, []),
        )


# --------------------------------------------------------------- LLaVA JSON
ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}


def llava_json(
    json_path: str | Path, image_folder: str | Path, strict: bool = False, allow_outside: bool = False
) -> Dataset:
    """``allow_outside``: image paths may resolve outside ``image_folder`` (see :class:`FileImages`)."""
    json_path, image_folder = Path(json_path), Path(image_folder)
    try:
        records = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{json_path} is not a readable LLaVA JSON file: {err}") from err
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: a LLaVA JSON file holds a list of records, not {type(records).__name__}")
    paths: dict[str, int] = {}
    samples: list[Sample] = []
    ds = Dataset(json_path.name, samples, FileImages(image_folder, [], allow_outside))
    for n, rec in enumerate(records):
        rid = str(rec.get("id", f"#{n}")) if isinstance(rec, dict) else f"#{n}"
        try:
            messages = llava_messages(rec)
            image = rec.get("image")
            if image is not None and (not isinstance(image, str) or not image.strip()):
                raise BadSample(f"'image' must be one relative path, not {type(image).__name__} {str(image)[:60]!r}")
            if image is not None and any(ord(c) < 32 or ord(c) == 127 for c in image):
                raise BadSample(f"'image' path {image[:60]!r} holds a control character")
            check_conversation(messages, image is not None)
        except BadSample as err:
            ds.skip(rid, str(err), strict)
            continue
        if image is not None:
            paths.setdefault(image, len(paths))
        samples.append(Sample(rid, messages, None if image is None else paths[image]))
    ds.images = FileImages(image_folder, list(paths), allow_outside)  # no file is opened or even listed here
    return ds


def llava_messages(rec: Any) -> list[dict[str, str]]:
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list) or not rec["conversations"]:
        raise BadSample("malformed record: no 'conversations' list")
    out = []
    for i, turn in enumerate(rec["conversations"]):
        if not isinstance(turn, dict):
            raise BadSample(f"turn {i} is a {type(turn).__name__}, not an object with 'from' and 'value'")
        for key in ("from", "value"):  # by type first: a list or object here must not reach a dict lookup
            if not isinstance(turn.get(key), str):
                raise BadSample(
                    f"turn {i}: '{key}' is {type(turn.get(key)).__name__} {str(turn.get(key))[:40]}, not a string"
                )
        if turn["from"] not in ROLES:
            raise BadSample(f"turn {i}: 'from' is {turn['from'][:40]!r}; known: {', '.join(ROLES)}")
        out.append({"role": ROLES[turn["from"]], "content": turn["value"]})
    return out


def check_conversation(messages: list[dict[str, str]], has_image: bool) -> None:
    """A trainable conversation: an optional system turn, then user / assistant turns alternating from a user turn
    and ending on an answer, no empty answer, and exactly one ``<image>``, in the first user turn, when the record has
    an image (none otherwise). Raises :class:`BadSample` naming what is wrong."""
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles and roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if not body or body != expected[: len(body)] or body[-1] != "assistant":
        raise BadSample(
            f"turn order {'/'.join(roles) or 'empty'}: needs user/assistant turns alternating from a user turn and "
            "ending on an assistant answer (an optional system turn first)"
        )
    if any(not m["content"].strip() for m in messages if m["role"] == "assistant"):
        raise BadSample("an assistant turn is empty")
    counts = [m["content"].count(IMAGE_TOKEN) for m in messages]
    first_user = roles.index("user")
    if has_image and (sum(counts) != 1 or counts[first_user] != 1):
        raise BadSample(
            f"has an image but {sum(counts)} <image> tokens ({counts[first_user]} in the first user turn); exactly "
            "one, in the first user turn, is supported"
        )
    if not has_image and sum(counts):
        raise BadSample(f"has {sum(counts)} <image> token(s) in its text but no image")


# ----------------------------------------------------- HF messages + images
def hf_messages(path: str | Path, split: str = "train", strict: bool = False) -> Dataset:
    """A local Hugging Face dataset with ``messages`` (role + content list) and ``images`` columns.

    The images are read undecoded and only when a batch needs them (:class:`HFImages`); listing the records reads
    the text columns alone."""
    try:
        import datasets  # (optional: the hf extra)
    except ImportError:
        raise ValueError("--data hf reads Hugging Face datasets: pip install 'connector-zoo[hf]'") from None

    path = Path(path)
    try:
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            data = datasets.load_from_disk(str(path))
        else:
            data = datasets.load_dataset(str(path))
        if isinstance(data, datasets.DatasetDict):
            data = data[split]
    except Exception as err:
        raise ValueError(f"{path} is not a readable Hugging Face dataset ({type(err).__name__}: {err})") from err
    if data._indices is not None:  # a selection or shuffle saved as an index mapping: rows in their own order
        data = data.flatten_indices()
    text = data.select_columns([c for c in ("id", "messages") if c in data.column_names])
    counts = image_counts(data)
    samples: list[Sample] = []
    rows, names = [], []
    ds = Dataset(path.name, samples, HFImages(f"hf:{path.resolve()}:{split}", data.data, "images", rows, names))
    for n, rec in enumerate(text):
        rid = str(rec.get("id", f"#{n}"))
        try:
            messages, n_images = hf_record_messages(rec)
        except BadSample as err:
            ds.skip(rid, str(err), strict)
            continue
        have = counts[n] if counts is not None else 0
        try:
            if n_images != have or n_images > 1:
                raise BadSample(f"{n_images} image placeholders for {have} images (one image per sample is supported)")
            check_conversation(messages, bool(have))
        except BadSample as err:
            ds.skip(rid, str(err), strict)
            continue
        index = None
        if have:
            index = len(rows)
            rows.append(n)
            names.append(rid)
        samples.append(Sample(rid, messages, index))
    return ds


def image_counts(data) -> list[int] | None:
    """Images per row from the Arrow list lengths (no image byte is read), or None without an ``images`` column."""
    import pyarrow.compute as pc

    if "images" not in data.column_names:
        return None
    return pc.fill_null(pc.list_value_length(data.data.column("images")), 0).to_pylist()


def hf_record_messages(rec: dict[str, Any]) -> tuple[list[dict[str, str]], int]:
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadSample("malformed record: no 'messages' list")
    out, n_images = [], 0
    for m in msgs:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = []
            for item in content:
                if not isinstance(item, dict):
                    raise BadSample(f"malformed content item {str(item)[:60]!r}: needs a 'type'")
                if item.get("type") == "image":
                    parts.append(IMAGE_TOKEN)
                    n_images += 1
                elif item.get("type") == "text" and isinstance(item.get("text"), str):
                    parts.append(item["text"])
            text = "\n".join(parts)
        else:
            raise BadSample(f"malformed message {str(m)[:60]!r}")
        if not isinstance(m.get("role"), str) or m["role"] not in ("user", "assistant", "system"):
            raise BadSample(f"unknown role {str(m.get('role'))[:40]!r}")
        out.append({"role": m["role"], "content": text})
    return out, n_images


# ----------------------------------------------------------------- the world
def world_dataset(
    world,
    split: str,
    captions: bool = True,
    questions: bool = True,
    qa_turns: int = 1,
    fresh_questions: int | None = None,
    branches: bool = False,
) -> Dataset:
    """The split's samples: per scene its caption and its questions, one question a sample, or with ``qa_turns`` > 1
    up to that many of a scene's questions as the turns of one conversation (the image once, in the first turn; a
    label on every answer), as LLaVA's instruction data asks several questions of one image. The caption stays a
    sample of its own (in the same conversation it would answer the position questions in words).

    ``fresh_questions`` = k (training data, ``--train-questions``): each scene's questions are k drawn afresh by the
    world's generator (``bench.data.world.fresh_questions``: one of each of the 7 types while types last) instead of the
    ones the world recorded (``questions_per_image``, 3), as denser instruction data asks more of each image.

    ``branches`` (with ``qa_turns`` > 1, ``--qa-branches``): the conversation's questions are branches that share the
    image (``Sample.meta["branches"]``; ``LLMBackend.encode_branches``): each is answered as if asked alone, as
    evaluation asks it, seeing neither the other questions nor their answers, and the image's visual tokens are
    computed once for all of them. In a plain conversation a later question can be answered from an earlier answer
    ("Where is the red circle?" "top left", then "Is the red circle left of ...?"), which evaluation never offers."""
    from bench.data.world import fresh_questions as draw

    records = world.records(split)
    samples = []
    if qa_turns < 1:
        raise SettingError(f"world data: qa_turns={qa_turns} must be at least 1")
    if fresh_questions is not None and fresh_questions < 1:
        raise SettingError(f"world data: train_questions={fresh_questions} must be at least 1")
    for i, r in enumerate(records):
        if fresh_questions is not None:
            r = {**r, "qa": draw(r, fresh_questions, world.cfg.seed)}
        if captions:
            samples.append(
                Sample(
                    f"{r['id']}/caption",
                    [
                        {"role": "user", "content": f"{IMAGE_TOKEN}\n{CAPTION_PROMPT}"},
                        {"role": "assistant", "content": r["caption"]},
                    ],
                    i,
                    {"type": "caption", "answer": r["caption"]},
                )
            )
        if questions and qa_turns > 1:
            for j in range(0, len(r["qa"]), qa_turns):
                turns = r["qa"][j : j + qa_turns]
                messages = []
                for t, qa in enumerate(turns):
                    image = f"{IMAGE_TOKEN}\n" if t == 0 else ""
                    messages += [
                        {"role": "user", "content": image + qa["question"]},
                        {"role": "assistant", "content": qa["answer"]},
                    ]
                meta = {"type": "conversation", "types": [qa["type"] for qa in turns], "answer": turns[-1]["answer"]}
                if branches:
                    meta["branches"] = True
                samples.append(Sample(f"{r['id']}/q{j}-{j + len(turns) - 1}", messages, i, meta))
        elif questions:
            for j, qa in enumerate(r["qa"]):
                samples.append(
                    Sample(
                        f"{r['id']}/q{j}",
                        [
                            {"role": "user", "content": f"{IMAGE_TOKEN}\n{qa['question']}"},
                            {"role": "assistant", "content": qa["answer"]},
                        ],
                        i,
                        {"type": qa["type"], "answer": qa["answer"]},
                    )
                )
    table = ArrayImages(f"world:{world.cfg.key()}:{split}", world.images(split), [r["id"] for r in records])
    return Dataset(f"world:{split}", samples, table)
