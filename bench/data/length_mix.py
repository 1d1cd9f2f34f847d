"""A LLaVA-format data set shaped like LLaVA-1.5's 665K instruction mix (``llava_v1_5_mix665k.json``): the same sources
in the same shares, each with its own number of turns and lengths of questions and answers, text-only ShareGPT
conversations among them. For measuring what padding, packing and the LM head cost on data shaped like a user's; the
words are filler (a seeded draw from a small vocabulary) and the images noise.

The shares are the paper's (Liu et al., *Improved Baselines with Visual Instruction Tuning*, 2023, appendix table of
the instruction-following mixture: LLaVA 158K = conversation 58K + detail 23K + complex reasoning 77K, ShareGPT 40K,
VQAv2 83K, GQA 72K, OKVQA 9K, OCR-VQA 80K, A-OKVQA 66K, TextCaps 22K, RefCOCO 48K, VG 86K; 665K in all). The turns
per conversation and the words per question and answer are **assumptions**, not published statistics (none were found
offline): LLaVA-1.5 merges the short-answer VQA questions of one image into one multi-turn conversation and adds the
format prompt ("Answer the question using a single word or phrase."); LLaVA's own data has long answers; ShareGPT is
long multi-turn text. Each range below is drawn uniformly.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    name: str
    conversations: int  # in the 665K mix
    image: bool
    turns: tuple[int, int]  # question-answer rounds per conversation (inclusive range)
    question_words: tuple[int, int]
    answer_words: tuple[int, int]
    suffix: str = ""  # the format prompt LLaVA-1.5 adds to the question


SHORT = "Answer the question using a single word or phrase."
SOURCES = (
    Source("llava_conversation", 58_000, True, (2, 5), (8, 20), (30, 90)),
    Source("llava_detail", 23_000, True, (1, 1), (6, 12), (80, 160)),
    Source("llava_reasoning", 77_000, True, (1, 1), (10, 25), (60, 130)),
    Source("sharegpt", 40_000, False, (1, 6), (15, 150), (80, 400)),
    Source("vqav2", 83_000, True, (3, 6), (4, 10), (1, 2), SHORT),
    Source("gqa", 72_000, True, (4, 10), (5, 12), (1, 2), SHORT),
    Source("okvqa", 9_000, True, (1, 2), (6, 12), (1, 3), SHORT),
    Source("ocrvqa", 80_000, True, (4, 6), (4, 10), (1, 5), SHORT),
    Source("aokvqa", 66_000, True, (1, 2), (20, 32), (1, 1), "Answer with the option's letter from the given choices."),
    Source("textcaps", 22_000, True, (1, 1), (6, 10), (8, 20)),
    Source("refcoco", 48_000, True, (3, 8), (6, 12), (4, 4)),
    Source("vg", 86_000, True, (4, 10), (8, 12), (3, 8)),
)
TOTAL = sum(s.conversations for s in SOURCES)  # 664,000: the paper rounds to 665K

FILLER = (
    "the a of and to in is on with for that this it as at by from what which image shows there are two red blue "
    "green small large left right top bottom near behind person car dog table sign text color number object scene"
)
WORDS = FILLER.split()


def words(rng: random.Random, bounds: tuple[int, int]) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*bounds)))


def conversation(source: Source, rng: random.Random) -> list[dict[str, str]]:
    turns = []
    for k in range(rng.randint(*source.turns)):
        question = words(rng, source.question_words).capitalize() + "?"
        if source.suffix:
            question += "\n" + source.suffix
        if k == 0 and source.image:
            question = "<image>\n" + question
        answer = words(rng, source.answer_words).capitalize() + "."
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def write_length_mix(out: str | Path, n: int, seed: int = 0, image_size: int = 64) -> Path:
    """``n`` records drawn from :data:`SOURCES` by their shares (``out/length_mix.json``) and one noise image per
    image record (``out/images``, PNG, ``image_size`` pixels square). Deterministic in ``seed``; written beside and
    renamed into place."""
    import numpy as np
    from PIL import Image

    from connector_zoo.io import atomic_path, write_json

    out = Path(out)
    rng = random.Random(seed)
    pixels = np.random.default_rng(seed)
    weights = [s.conversations for s in SOURCES]
    records = []
    with atomic_path(out / "images") as images:
        images.mkdir()
        for i in range(n):
            source = rng.choices(SOURCES, weights)[0]
            record = {"id": f"{source.name}-{i:06d}", "source": source.name}
            if source.image:
                name = f"{i:06d}.png"
                array = pixels.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
                Image.fromarray(array).save(images / name)
                record["image"] = name
            record["conversations"] = conversation(source, rng)
            records.append(record)
    write_json(out / "length_mix.json", records)
    return out / "length_mix.json"


def write_noise_captions(out: str | Path, n: int = 8, size: tuple[int, int] = (400, 300)) -> Path:
    """The smallest real-format set: ``n`` LLaVA-JSON records (``out/chat.json``), each a ``size`` (width, height)
    noise PNG in ``out/images`` with one caption question and a one- or two-word answer. The processors resize and
    crop the images to their own size (336 px for CLIP-L/336, 384 for SigLIP-so400m/384). Deterministic."""
    import numpy as np
    from PIL import Image

    from connector_zoo.io import atomic_path, write_json

    out = Path(out)
    rng = np.random.default_rng(0)
    records = []
    with atomic_path(out / "images") as images:
        images.mkdir()
        for i in range(n):
            array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(array).save(images / f"{i}.png")
            answer = ["Noise.", "Random pixels.", "Static."][i % 3]
            conversation = [{"from": "human", "value": "<image>\nDescribe the image briefly."}]
            records.append(
                {"id": f"r{i}", "image": f"{i}.png", "conversations": [*conversation, {"from": "gpt", "value": answer}]}
            )
    write_json(out / "chat.json", records)
    return out / "chat.json"


def shape(records: list[dict]) -> dict[str, float]:
    """The shape of a data set: share of text-only records, turns per record, words per record (mean, min, max)."""
    turns = [len(r["conversations"]) // 2 for r in records]
    lengths = [sum(len(t["value"].split()) for t in r["conversations"]) for r in records]
    return {
        "records": len(records),
        "text_only_share": sum("image" not in r for r in records) / len(records),
        "turns_mean": sum(turns) / len(turns),
        "words_mean": sum(lengths) / len(lengths),
        "words_min": min(lengths),
        "words_max": max(lengths),
    }


def main() -> None:  # python -m bench.data.length_mix OUT [N]
    import sys

    out, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    path = write_length_mix(out, n)
    print(f"wrote {path}: {json.dumps(shape(json.loads(path.read_text())))}")


if __name__ == "__main__":
    main()
