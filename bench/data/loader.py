"""The input pipeline: samples -> :class:`~connector_zoo.model.vlm.VLMInputs`, in data-loader workers.

A worker (``Collator.prepare``) tokenizes each sample with the LLM's chat template (a bounded cache keeps repeated
texts), computes image identities, reads the feature rows already stored and decodes + preprocesses the other
images. The main process (``Collator.finish``) runs the frozen encoder on those images, on the accelerator, stores
their rows when the cache is on, and assembles the batch. A sample that turns out bad at that point (missing or
corrupt image, a text too long for the context) is dropped from its batch and reported, never raised in a worker.

The order is the trainer's: :class:`StepSampler` yields the micro-batches of optimizer steps ``start..total`` (each
process its own slice), so the position is a function of the step and a resumed run reads exactly what an
uninterrupted one would. Nothing is prepared up front: the time to the first step does not grow with the data.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import multiprocessing
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler

from bench.data.features import FeatureCache, Partial
from bench.data.formats import Sample
from bench.data.images import BadSample
from connector_zoo.model.vlm import VLMInputs
from llms.base import IMAGE_TOKEN, LLMBackend, TemplateError


def default_num_workers() -> int:
    """One worker per CPU core this process may use, minus one for the main process; at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores - 1))


@dataclass
class Prepared:
    """A worker's half of a batch: tokens of the samples kept, their image features' raw material, and the
    samples dropped with their reasons."""

    kept: list[int]  # positions of the samples kept, among those asked for
    ids: list[str]
    input_ids: list[list[int]]  # lists, not tensors: pickled in one piece instead of a shared-memory file each
    labels: list[list[int]]
    positions: list[list[int] | None]  # a sample of branches: its tokens' position ids (else None: their index)
    has_image: list[bool]
    images: Partial | None
    skipped: list[tuple[str, str]]

    def pin_memory(self) -> Prepared:
        return dataclasses.replace(self, images=self.images and self.images.pin_memory())


@dataclass
class Batch:
    """A finished batch: the model's inputs (None when every sample was dropped), which samples they are, and the
    samples dropped with their reasons."""

    inputs: VLMInputs | None
    kept: list[int]
    skipped: list[tuple[str, str]]

    def __len__(self) -> int:
        return len(self.kept)


def branches(messages: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """A conversation of question turns as branches (``Sample.meta["branches"]``): each user-assistant pair as a
    conversation of its own, the image (the first user turn's leading ``<image>``) in every one, on a line of its own in
    the later ones; TemplateError (the sample is skipped with that reason) when the turns are not such pairs."""
    roles = [m.get("role") for m in messages]
    if not messages or len(messages) % 2 or any(r != ("user", "assistant")[i % 2] for i, r in enumerate(roles)):
        raise TemplateError(
            f"branches need user-assistant pairs, one per question; this conversation's roles are {roles} "
            "(ask for plain conversations with --no-qa-branches)"
        )
    first = messages[0]["content"]
    image = IMAGE_TOKEN + "\n" if first.startswith(IMAGE_TOKEN) else ""  # its own line in every later branch
    out = []
    for i in range(0, len(messages), 2):
        user, answer = messages[i], messages[i + 1]
        text = user["content"] if i == 0 else image + user["content"]
        out.append([{**user, "content": text}, answer])
    return out


class Collator:
    """Samples -> batches, with image features from ``features`` (a :class:`FeatureCache`, cached or online).

    ``visual_budget`` is the connector's maximum number of visual tokens: a sample whose text plus that budget does
    not fit ``max_length`` is reported instead of truncated.
    """

    def __init__(
        self,
        llm: LLMBackend,
        features: FeatureCache,
        visual_budget: int,
        max_length: int | None,
        cache_size: int = 65536,
    ):
        self.llm, self.features, self.visual_budget, self.max_length = llm, features, visual_budget, max_length
        self.cache_size = cache_size
        self._encoded: OrderedDict[str, object] = OrderedDict()

    def encode(self, sample: Sample):
        """Token ids and labels of a sample (identical texts tokenize once, in a bounded cache); BadSample when the
        template fails or the sample cannot fit the context."""
        branched = bool(sample.meta.get("branches"))
        key = json.dumps(sample.messages) + f"|{sample.image is not None}|{branched}"
        hit = self._encoded.get(key)
        if hit is not None:
            self._encoded.move_to_end(key)
        else:
            try:
                hit = (
                    self.llm.encode_branches(branches(sample.messages))
                    if branched
                    else self.llm.encode_conversation(sample.messages)
                )
            except TemplateError as err:
                hit = BadSample(str(err))
            n_visual = self.visual_budget if sample.image is not None else 0
            if not isinstance(hit, BadSample) and self.max_length and len(hit) - 1 + n_visual > self.max_length:
                hit = BadSample(
                    f"needs {len(hit) - 1 + n_visual} tokens ({n_visual} visual), more than the context "
                    f"budget {self.max_length}; not truncated"
                )
            self._encoded[key] = hit
            if len(self._encoded) > self.cache_size:
                self._encoded.popitem(last=False)
        if isinstance(hit, BadSample):
            raise BadSample(str(hit))
        return hit

    # ------------------------------------------------------------ two halves
    def prepare(self, samples: list[Sample]) -> Prepared:
        """The worker's half (no encoder forward)."""
        kept, encoded, skipped = [], [], []
        for pos, s in enumerate(samples):
            try:
                encoded.append(self.encode(s))
                kept.append(pos)
            except BadSample as err:
                skipped.append((s.id, str(err)))
        images = [samples[p].image for p in kept if samples[p].image is not None]
        return Prepared(
            kept,
            [samples[p].id for p in kept],
            [e.input_ids for e in encoded],
            [e.labels for e in encoded],
            [e.positions for e in encoded],
            [samples[p].image is not None for p in kept],
            self.features.gather(images) if images else None,
            skipped,
        )

    def finish(self, prep: Prepared) -> Batch:
        """The main process's half: encoder forward for images not stored, samples with unreadable images dropped."""
        features, drop = None, set()
        if prep.images is not None:
            got = self.features.complete(prep.images)
            features, bad = got.features, got.by_sample(prep.has_image)
            drop = set(bad)
            skipped = prep.skipped + [(prep.ids[j], reason) for j, reason in bad.items()]
        else:
            skipped = prep.skipped
        keep = [j for j in range(len(prep.kept)) if j not in drop]
        if not keep:
            return Batch(None, [], skipped)
        inputs = VLMInputs(
            input_ids=[torch.tensor(prep.input_ids[j]) for j in keep],
            labels=[torch.tensor(prep.labels[j]) for j in keep],
            positions=(
                [None if prep.positions[j] is None else torch.tensor(prep.positions[j]) for j in keep]
                if any(prep.positions[j] is not None for j in keep)
                else None
            ),
            features=features,
            has_image=[prep.has_image[j] for j in keep],
            image_sizes=got.image_sizes if prep.images is not None else None,
        )
        return Batch(inputs, [prep.kept[j] for j in keep], skipped)

    def batch(self, samples: list[Sample]) -> Batch:
        return self.finish(self.prepare(samples))

    def __call__(self, samples: list[Sample]) -> VLMInputs:
        """All samples or :class:`BadSample` (for callers that need every sample, e.g. a profile)."""
        out = self.batch(samples)
        if out.skipped:
            raise BadSample(f"sample {out.skipped[0][0]!r}: {out.skipped[0][1]}")
        return out.inputs


# ---------------------------------------------------------------- loading
class MicroBatches(torch.utils.data.Dataset):
    """Map-style view for the DataLoader: a key is a tuple of sample indices, an item the worker's half."""

    def __init__(self, samples: list[Sample], collator: Collator):
        self.samples, self.collator = samples, collator

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, indices: tuple[int, ...]) -> Prepared:
        return self.collator.prepare([self.samples[i] for i in indices])


class StepSampler(Sampler):
    """Micro-batches of optimizer steps ``start..total``: ``order(step, micro)`` gives each one's sample indices."""

    def __init__(self, order: Callable[[int, int], list[int]], start: int, total: int, grad_accum: int):
        self.order, self.start, self.total, self.grad_accum = order, start, total, grad_accum

    def __len__(self) -> int:
        return (self.total - self.start) * self.grad_accum

    def __iter__(self):
        for step in range(self.start, self.total):
            for micro in range(self.grad_accum):
                yield tuple(self.order(step, micro))


def _identity(item):
    return item


UNIX_PATH_MAX = 107  # bytes of an AF_UNIX socket path on Linux (sun_path is 108, with its terminating NUL)


def worker_sockets_fit(tmp: str | None = None) -> bool:
    """Whether a worker can pass tensors by file descriptor: torch's default sharing strategy sends the descriptor
    over an AF_UNIX socket that multiprocessing binds under the temporary directory
    (``$TMPDIR/pymp-xxxxxxxx/listener-xxxxxxxx``), and a path longer than the kernel's limit cannot be bound (torch's
    other strategy, ``file_system``, starts its shared-memory manager on a socket there too)."""
    socket = os.path.join(tmp or tempfile.gettempdir(), "pymp-xxxxxxxx", "listener-xxxxxxxx")
    return len(os.fsencode(socket)) <= UNIX_PATH_MAX


def short_temp_dir() -> str:
    """A temporary directory whose worker sockets fit, for a worker when ``$TMPDIR``'s do not."""
    for tmp in ("/tmp", "/var/tmp", "/dev/shm"):
        if worker_sockets_fit(tmp) and os.path.isdir(tmp) and os.access(tmp, os.W_OK | os.X_OK):
            return tmp
    raise RuntimeError(
        f"the temporary directory {tempfile.gettempdir()!r} is too long for the sockets data-loader workers pass "
        f"tensors through (at most {UNIX_PATH_MAX} bytes with multiprocessing's pymp-*/listener-* names) and none "
        "of /tmp, /var/tmp, /dev/shm is writable; set TMPDIR to a shorter directory, or --num-workers 0"
    )


def use_temp_dir(tmp: str, worker_id: int) -> None:
    """A worker's ``worker_init_fn``: its temporary files (multiprocessing's socket directory) under ``tmp``."""
    tempfile.tempdir = tmp


def make_loader(samples: list[Sample], collator: Collator, sampler: Sampler, num_workers: int) -> DataLoader:
    """Workers forked where the platform allows it (they share the tokenizer and preprocessing without pickling
    them); pinned memory when a GPU is present; a private generator, so creating the loader leaves the global
    torch RNG (dropout, resumed from checkpoints) untouched. Where ``$TMPDIR`` is too long for the sockets that pass
    a worker's tensors (:func:`worker_sockets_fit`), the workers keep their sockets in a short one."""

    fork = "fork" in multiprocessing.get_all_start_methods()
    init = None
    if num_workers and not worker_sockets_fit():
        # else the first batch hangs: the worker's send fails in its queue's feeder thread (an error on stderr) and the
        # main process waits for the batch forever
        init = functools.partial(use_temp_dir, short_temp_dir())
    return DataLoader(
        MicroBatches(samples, collator),
        batch_size=None,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_identity,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=2 if num_workers else None,
        generator=torch.Generator().manual_seed(0),
        multiprocessing_context="fork" if num_workers and fork else None,
        worker_init_fn=init,
    )
