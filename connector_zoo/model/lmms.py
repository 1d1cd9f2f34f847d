"""connector-zoo as an lmms-eval model: any run directory, evaluated by lmms-eval's own tasks and metrics.

``python -m lmms_eval --model connector_zoo --model_args run=RUN --tasks ...`` after ``pip install
"connector-zoo[eval]"`` (lmms-eval 0.7 reads the entry-point group ``lmms_eval.models``, which names
:func:`manifest`); ``bench eval RUN --tasks ...`` calls lmms-eval's Python API with this class.

- ``generate_until``: batched greedy generation with the backend's chat template (``<image>`` first in the user
  turn, as training saw it), the run's precision and device; the task's ``max_new_tokens`` and ``until`` honoured.
- ``loglikelihood``: the sum of the continuation's token log-probabilities after the prompt and whether greedy
  decoding would produce it (multiple-choice tasks).
- ``visual_tokens``: the visual tokens each evaluated image gave (``bench eval`` records their mean).

Model arguments: ``run`` (required), ``batch_size`` (16), ``allow_dotted_paths`` and ``verify`` (as ``bench eval``).
Loading the run names it in ``CONNECTOR_ZOO_EVAL_RUN``, so the harness's ``connector_zoo_world`` task
(``bench/evaluate/lmms_tasks``) asks the questions of the world that run was trained on.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image

from connector_zoo.model.inputs import VLMInputs
from connector_zoo.model.precision import autocast, run_precision
from connector_zoo.model.vlm import VLM

RUN_ENV = "CONNECTOR_ZOO_EVAL_RUN"  # the run being evaluated, for tasks that depend on it (the world task)


def manifest() -> ModelManifest:
    """The entry point lmms-eval 0.7 loads (group ``lmms_eval.models``)."""
    return ModelManifest(model_id="connector_zoo", simple_class_path="connector_zoo.model.lmms.ConnectorZooLMM")


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


class ConnectorZooLMM(lmms):
    is_simple = True

    def __init__(
        self,
        run: str,
        batch_size: int | str = 16,
        allow_dotted_paths: bool | str = False,
        verify: bool | str = True,
        **kwargs,
    ) -> None:
        super().__init__()
        self.run_dir = Path(run)
        self.vlm = VLM.load(self.run_dir, allow_dotted_paths=_flag(allow_dotted_paths), verify=_flag(verify)).eval()
        self.precision = run_precision(self.run_dir)
        self.batch_size = int(batch_size)
        self.visual_tokens: list[int] = []
        os.environ[RUN_ENV] = str(self.run_dir.resolve())

    # ------------------------------------------------------------------ helpers
    def _visual(self, request: Instance, doc_to_visual) -> Image.Image | None:
        task, split, doc_id = request.args[-2], request.args[-1], request.args[-3]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        visuals = [v for v in (visuals or []) if isinstance(v, Image.Image)]
        if len(visuals) > 1:
            raise ValueError(f"{task}: document {doc_id} has {len(visuals)} images; connector-zoo runs take one")
        return visuals[0].convert("RGB") if visuals else None

    def _messages(self, context: str, image: Image.Image | None) -> list[dict[str, str]]:
        return [{"role": "user", "content": ("<image>\n" if image is not None else "") + context}]

    def _autocast(self):
        return autocast(self.precision, self.vlm.device)

    # ------------------------------------------------------------------ requests
    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):  # one batch per set of generation settings
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        for indices in groups.values():
            gen = dict(requests[indices[0]].args[1])
            until = gen.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen.pop("max_new_tokens", 32))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                images = [self._visual(requests[i], requests[i].args[2]) for i in chunk]
                prompts = [self._messages(requests[i].args[0], im) for i, im in zip(chunk, images)]
                has = [im is not None for im in images]
                ids = [torch.tensor(self.vlm.llm.encode_prompt(p)) for p in prompts]
                px, sizes = self.vlm.preprocess([im for im in images if im is not None]) if any(has) else (None, None)
                with self._autocast():
                    # the encoder runs once: its features serve the token count and the generation
                    features = self.vlm.encode(px.to(self.vlm.device)) if px is not None else None
                    inputs = VLMInputs(ids, features=features, has_image=has, image_sizes=sizes)
                    visual = self.vlm.visual_tokens(inputs)
                    if visual is not None:
                        self.visual_tokens += visual.num_tokens.tolist()
                    texts = self.vlm.decode(self.vlm.generate_ids(inputs, max_new_tokens=max_new))
                for i, text in zip(chunk, texts):
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), text)
        return out

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        for r in requests:
            context, target, doc_to_visual, doc_id, task, split = r.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            image = self._visual(r, doc_to_visual)
            prompt = self.vlm.llm.encode_prompt(self._messages(context, image))
            cont = self.vlm.llm.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            ids = torch.tensor(prompt + cont)
            px, sizes = self.vlm.preprocess([image]) if image is not None else (None, None)
            with self._autocast():
                out = self.vlm(VLMInputs([ids], pixel_values=px, has_image=[image is not None], image_sizes=sizes))
            logits = out.logits[0, -len(cont) - 1 : -1].float()
            target_ids = torch.tensor(cont)
            logprob = logits.log_softmax(-1).gather(1, target_ids[:, None]).sum().item()
            results.append((logprob, bool((logits.argmax(-1) == target_ids).all())))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("connector-zoo runs answer single-turn tasks (generate_until, loglikelihood)")
