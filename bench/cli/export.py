"""``bench export-hf`` (Llava format) and ``bench save-pretrained`` (the transformers-native format)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.cli.common import (  # noqa: F401
    data_from_args,
    demo_images,
    load_run,
    parse_lora,
    specs_from_args,
    vlm_from_args,
    world_config,
)


def cmd_export_hf(args: argparse.Namespace) -> None:
    from connector_zoo.model.llava import export_hf

    vlm = vlm_from_args(args).eval()
    unmerged = not args.merge and vlm.llm.lora is not None
    if not args.merge and not unmerged:
        print("export-hf: --no-merge: this model has no LoRA adapters; the export is the same either way")
    out = export_hf(vlm, args.out, merge=args.merge)
    kind = "LlavaForConditionalGeneration" if vlm.tiling is None else "LlavaNextForConditionalGeneration"
    print(
        f"wrote {kind} to {out} (load with {kind}.from_pretrained and AutoProcessor.from_pretrained)"
        + (f"; the LoRA adapters unmerged in {out}/adapter (model.load_adapter)" if unmerged else "")
    )


def cmd_save_pretrained(args: argparse.Namespace) -> None:
    from connector_zoo.io import read_json
    from connector_zoo.model.modeling import ConnectorZooForConditionalGeneration

    run_dir = Path(args.run_dir)
    vlm = load_run(run_dir, args)
    results = read_json(run_dir / "results.json") if (run_dir / "results.json").exists() else None
    settings = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else None
    model = ConnectorZooForConditionalGeneration.from_vlm(vlm)
    model.save_pretrained(args.out, embed_backbones=args.embed_backbones, results=results, settings=settings)
    print(
        f"wrote {args.out}: `import connector_zoo.model`, then "
        f"AutoModelForImageTextToText.from_pretrained({str(args.out)!r})"
    )
