"""Full sharding with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``), applied by the harness itself.

``--shard full`` shards every stage that trains the LLM (stage 2), the way LLaVA's recipe runs its fine-tuning stage
under ZeRO-3 and its alignment stage under ZeRO-2: one ``fully_shard`` group per decoder layer (the classes the LLM
names in ``_no_split_modules``), then one root group for the rest (the connector, the embeddings, the LM head, the
frozen encoder, AnyRes's newline). Every parameter is then a ``DTensor`` sharded on dim 0 over the processes; each
layer is gathered for its forward and its backward and freed after, and gradients are reduce-scattered (mean) so
that each process keeps, and its optimizer updates, only its own shard. A stage that trains the connector alone runs
replicated as before (its frozen LLM holds no gradient or optimizer state).

The same code runs on GPUs (NCCL) and on CPUs (gloo): accelerate's own FSDP plugin turns into DDP on a machine without
CUDA, so the harness does not go through it. Mixed precision is FSDP2's policy (bf16 parameters for compute, fp32
gradient reduction) when the run asks for bf16. Checkpoints are written from the shards as full tensors (gathered,
then written by rank 0 in the format of an unsharded run: ``trainable.safetensors`` + ``optimizer.pt`` keyed by
parameter name), so a sharded run's checkpoint loads into one process or into any number.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: the values of ``--shard``
SHARD_MODES = ("none", "full")


def dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def layer_classes(llm_model: nn.Module) -> set[str]:
    """The class names of the decoder layers (transformers' ``_no_split_modules``; through a peft wrapper too)."""
    for candidate in (llm_model, getattr(llm_model, "get_base_model", lambda: None)()):
        names = getattr(candidate, "_no_split_modules", None)
        if names:
            return set(names)
    raise ValueError(
        f"{type(llm_model).__name__} names no decoder layer class (_no_split_modules): --shard full cannot tell "
        "where one layer ends"
    )


def shard(vlm: nn.Module, precision: str = "no") -> int:
    """``fully_shard`` each decoder layer of ``vlm.llm.model`` and then ``vlm`` itself (the root group); returns the
    number of layer groups. ``precision`` bf16/fp16: FSDP2's MixedPrecisionPolicy (half parameters in compute, fp32
    reduction). Needs an initialised process group; every parameter must be stored in one dtype (fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtypes = {p.dtype for p in vlm.parameters()}
    if len(dtypes) > 1:
        raise ValueError(
            f"--shard full needs every weight stored in one dtype, found {sorted(map(str, dtypes))}: "
            "use --backbone-dtype fp32 (FSDP2's mixed precision then computes in bf16 where --precision bf16 asks)"
        )
    policy = MixedPrecisionPolicy()
    if precision in ("bf16", "fp16"):
        half = torch.bfloat16 if precision == "bf16" else torch.float16
        policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)
    names = layer_classes(vlm.llm.model)
    layers = [m for m in vlm.llm.model.modules() if type(m).__name__ in names]
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(vlm, mp_policy=policy)
    return len(layers)


def ensure_process_group(device: torch.device) -> None:
    """A process group for ``fully_shard``: the one torchrun / accelerate started, else one of this process alone
    (NCCL on a GPU, gloo on the CPU), so that one process runs FSDP2's code path too."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def local_bytes(tensors) -> int:
    """Bytes this process holds for ``tensors``: a DTensor's local shard, a plain tensor whole."""
    DTensor = dtensor_type()
    total = 0
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every DTensor gathered to its full value, detached, on the CPU. A collective: every process calls
    it with the same keys in the same order."""
    DTensor = dtensor_type()
    out = {}
    for k, v in state.items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        out[k] = v.detach().contiguous().cpu()
    return out


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state keyed by parameter name, gathered from the shards to rank 0's CPU memory (a
    collective; the other processes get an empty state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimizer state into ``optimizer`` over ``model``'s parameters, sharded or not: keyed by parameter
    name (a sharded run's checkpoint) or by position (an unsharded run's ``optimizer.state_dict()``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not is_sharded(model) and not by_name(state):
        optimizer.load_state_dict(state)
        return
    if not by_name(state):
        state = named_optimizer_state(model, optimizer, state)
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def by_name(state: dict[str, Any]) -> bool:
    groups = state.get("param_groups", [])
    return bool(groups) and all(isinstance(p, str) for g in groups for p in g["params"])


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """An unsharded run's optimizer state (parameters by position in the groups) keyed by parameter name, the
    positions read against ``optimizer``'s groups (the same parameters in the same order: the same stage settings)."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in state["param_groups"] for i in g["params"]]
    if len(ids) != len(order):
        raise ValueError(
            f"the checkpoint's optimizer holds {len(ids)} parameters, this stage trains {len(order)}: it was written "
            "by other stage settings"
        )
    name_of = dict(zip(ids, order))
    return {
        "state": {name_of[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in state["param_groups"]],
    }
