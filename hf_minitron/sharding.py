"""FSDP2 for distillation through accelerate: the student sharded by the Trainer, the frozen teacher sharded too.

accelerate enables FSDP only for accelerator device types: an FSDP launch on CPU processes silently becomes plain
multi-CPU DDP (`AcceleratorState`, accelerate 1.15), although torch's FSDP2 (`fully_shard`) runs on CPU with gloo.
`enable_cpu_fsdp` lets the FSDP launch mean FSDP there too: it sets the state accelerate would have set on a GPU
(distributed type FSDP, the plugin built from the launcher's `FSDP_*` variables) before the Trainer builds its
`Accelerator`; from there on every step is accelerate's and the Trainer's own FSDP2 code. This is what lets the
sharded path be tested on a CPU-only machine; on GPUs it does nothing.

The teacher's decoder layers are sharded like the student's (`shard_teacher`): each its own FSDP2 unit, so each
rank holds 1/N of them and gathers one layer at a time in the forward.
"""

from __future__ import annotations

import os

import torch

from .archs import get_arch


def fsdp_requested() -> bool:
    """True when the launcher asked for FSDP (`accelerate launch` with an FSDP config exports ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def refuse_zero3() -> None:
    """Distillation under DeepSpeed ZeRO-3 is refused in one line: the chunked logit loss applies both LM heads after
    the models' forwards, where ZeRO-3 holds their weights partitioned (FSDP2 keeps them gathered until the
    backward: use the FSDP preset)."""
    if (os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"):
        raise ValueError("distillation does not run under DeepSpeed ZeRO-3 (zero_stage 3): the chunked logit loss "
                         "uses both LM heads outside the models' forwards, where ZeRO-3 keeps them partitioned; "
                         "launch with recipes/accelerate/fsdp.yaml (FSDP2 shards the student and the teacher)")


def enable_cpu_fsdp(cpu: bool) -> bool:
    """Under an FSDP launch on CPU processes, make accelerate's state FSDP (see the module's docstring).

    Call before the Trainer creates its `Accelerator`; `cpu` is the training device being CPU. Returns whether it
    changed anything. A GPU launch, a single process or a non-FSDP launch is left alone.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not (cpu and fsdp_requested() and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return False
    if not AcceleratorState._shared_state:
        Accelerator(cpu=True)  # the state is only made by an Accelerator; the Trainer's own then shares it
    state = AcceleratorState(cpu=True)
    if state.distributed_type == DistributedType.FSDP:
        return False
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"an FSDP launch on CPU gave accelerate state {state.distributed_type}, not MULTI_CPU")
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables the launcher exported
    if plugin.fsdp_version != 2:
        raise ValueError(f"FSDP on CPU processes needs fsdp_version 2 (torch's fully_shard), got "
                         f"{plugin.fsdp_version}: set fsdp_version: 2 in the accelerate config")
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    return True


def shard_teacher(teacher, accelerator):
    """The frozen teacher's decoder layers as FSDP2 units (the bulk of its weights: 1/N per process, gathered one
    layer at a time in its forward); its root (embeddings, final norm, LM head) stays whole on every process,
    because the chunked logit loss applies the LM head after the teacher's forward, where FSDP2 has resharded a
    no-grad root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ValueError(f"sharding the teacher needs FSDP2 (fsdp_version: 2), got {plugin.fsdp_version}")
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None:
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    kwargs = {"mesh": mesh, "reshard_after_forward": True,
              "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
    if plugin.cpu_offload is not None:
        kwargs["offload_policy"] = plugin.cpu_offload
    for layer in get_arch(teacher.config).decoder_layers(teacher):
        fully_shard(layer, **kwargs)
    return teacher.eval().requires_grad_(False)


def local_bytes(modules) -> tuple[int, int]:
    """(bytes of parameters this rank holds, bytes of the whole model's parameters) of a module or a list of
    modules: sharded DTensors count their local shard against their global size."""
    modules = [modules] if isinstance(modules, torch.nn.Module) else modules
    local = full = 0
    for p in (p for m in modules for p in m.parameters()):
        size = p.element_size()
        full += p.numel() * size
        local += (p.to_local().numel() if hasattr(p, "to_local") else p.numel()) * size
    return local, full
