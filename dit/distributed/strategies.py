"""Data-parallel strategies, chosen by ``train.strategy`` and applied from outside the model.

    ddp     Accelerate: one process, or DDP over N (NCCL on GPUs, gloo on CPU)
    zero1   DeepSpeed ZeRO stage 1 through Accelerate's DeepSpeed plugin (optimizer states sharded)
    zero2   ... stage 2 (+ gradients sharded);          train.offload_optimizer moves them to CPU
    zero3   ... stage 3 (+ parameters sharded);         train.offload_params too
    fsdp    torch FSDP2 ``fully_shard`` per block + root on a device mesh (train.fsdp_shard: full | hybrid).
            Accelerate only starts the processes here: its FSDP plugin does not run on CPU (fsdp_version 1
            finds "no available devices"; fsdp_version 2 runs unsynchronised processes), and plain FSDP2 does.

Every strategy gives the training loop the same small surface: ``backward``, ``clip_and_norm``, ``step``,
``skip``, ``update_ema``, the gathered ``model_state_dict`` / ``ema_state_dict`` for exports, and
``save`` / ``load`` of the (possibly sharded) model + optimizer state into a checkpoint directory.
The DiT itself never knows which one runs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from timm.utils import ModelEmaV3
from torch import nn

from dit.config import TrainConfig

log = logging.getLogger("dit.strategies")

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp")
DEEPSPEED_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


def clean_key(key: str) -> str:
    """Drop the activation-checkpointing wrapper's '.block.' so keys match a plain DiT."""
    return key.replace(".block.", ".")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def single_process_env(cfg: TrainConfig) -> None:
    """ZeRO and FSDP need a process group even for one process: without a launcher, make a 1-process one."""
    if cfg.strategy == "ddp" or "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      LOCAL_WORLD_SIZE="1")


def make_accelerator(cfg: TrainConfig, mixed_precision: str) -> Accelerator:
    """The Accelerator for ``cfg.strategy``: it starts the process group (gloo on CPU) and owns the device."""
    multi = world_size_from_env() > 1
    on_cpu = not torch.cuda.is_available()
    kwargs: dict[str, Any] = {"mixed_precision": mixed_precision}
    if cfg.strategy.startswith("zero"):
        from accelerate.utils import DeepSpeedPlugin

        # On CPU, Accelerate's DeepSpeed path needs use_cpu off and an explicit gloo process group.
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, mixed_precision))
        kwargs["gradient_accumulation_steps"] = cfg.grad_accum_steps  # = the engine's (else Accelerate warns)
        if on_cpu:
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    elif (multi or cfg.strategy == "fsdp") and on_cpu:
        kwargs["cpu"] = True  # = ACCELERATE_USE_CPU: DDP / process group over gloo
    return Accelerator(**kwargs)


def deepspeed_config(cfg: TrainConfig, mixed_precision: str) -> dict[str, Any]:
    """configs/deepspeed/zero{N}.json (or train.deepspeed_config), with the batch, clipping, precision and
    offload settings taken from the experiment config so the two never disagree."""
    stage = int(cfg.strategy[-1])
    path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else DEEPSPEED_CONFIGS / f"zero{stage}.json"
    ds = json.loads(path.read_text())
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum_steps
    ds.pop("train_batch_size", None)
    ds["gradient_clipping"] = cfg.grad_clip
    ds["bf16"] = {"enabled": mixed_precision == "bf16"}
    ds["fp16"] = {"enabled": mixed_precision == "fp16", "loss_scale": 0, "initial_scale_power": 16}
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = stage
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    # Our own torch AdamW (the same update as under DDP; no JIT-built fused/CPU Adam needed, also when offloading).
    ds["zero_allow_untested_optimizer"] = True
    ds["zero_force_ds_cpu_optimizer"] = False
    return ds


def _all_reduce_max(flag: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([flag], dtype=torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class Strategy:
    """DDP through Accelerate (also the single-process path). Subclasses change only what differs."""

    name = "ddp"

    def __init__(self, accelerator: Accelerator, model: nn.Module, cfg: TrainConfig) -> None:
        self.accelerator, self.cfg = accelerator, cfg
        self.ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)  # a full copy, before any sharding
        self.model, self.raw = self.wrap(model)
        self.opt = torch.optim.AdamW(self.raw.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.base_opt = self.opt  # the torch optimizer itself (what the LR scheduler drives)
        self.prepare()

    # --- setup
    def wrap(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        return model, model

    def prepare(self) -> None:
        self.model, self.opt = self.accelerator.prepare(self.model, self.opt)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    # --- one step
    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_and_norm(self) -> float | None:
        """Clip to train.grad_clip; return the global gradient norm before clipping (the same on every rank),
        or None where the engine clips inside ``step`` (DeepSpeed; its norm is then ``last_grad_norm``)."""
        return float(self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))

    last_grad_norm: float | None = None

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def no_sync(self, accumulating: bool) -> Any:
        """While ``accumulating`` (a micro-batch before the last), keep gradients local: no all-reduce."""
        return self.accelerator.no_sync(self.model) if accumulating else nullcontext()

    def skip(self) -> None:
        """Drop this step's gradients without touching weights or optimizer state."""
        self.opt.zero_grad(set_to_none=True)

    def any_rank(self, flag: bool) -> bool:
        return _all_reduce_max(1.0 if flag else 0.0, self.device) > 0

    def update_ema(self, step: int) -> None:
        self.ema.update(self.accelerator.unwrap_model(self.model), step=step)

    def local_params(self) -> dict[str, float]:
        """This rank's own copy of the parameters: element count and float64 sum. Replicated strategies give
        the same numbers on every rank; sharded ones about 1/N of the elements each (tests check both)."""
        numel, total = 0, 0.0
        for p in self.raw.parameters():
            local = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's partition
            if local is None:
                local = p.to_local() if hasattr(p, "to_local") else p.data  # FSDP2: the DTensor's shard
            numel += local.numel()
            total += float(local.detach().double().sum())
        return {"numel": numel, "sum": total}

    # --- state
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full trained weights (plain DiT keys), on rank 0 at least; a collective under sharding."""
        return {clean_key(k): v for k, v in self.accelerator.unwrap_model(self.model).state_dict().items()}

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        return {clean_key(k): v for k, v in self.ema.module.state_dict().items()}

    def save(self, ckpt: Path) -> dict[str, Any]:
        """Write sharded state under ``ckpt`` (every rank calls this); return what goes into training_state.pt."""
        state = {"optimizer": self.opt.state_dict(), "model": self.model_state_dict()}
        if self.accelerator.scaler is not None:  # fp16: the dynamic loss scale
            state["scaler"] = self.accelerator.scaler.state_dict()
        return state

    def load(self, ckpt: Path, state: dict[str, Any]) -> None:
        model = self.accelerator.unwrap_model(self.model)
        model.load_state_dict(_rewrap_keys(state["model"], model.state_dict()))
        self.opt.load_state_dict(state["optimizer"])
        if self.accelerator.scaler is not None and "scaler" in state:
            self.accelerator.scaler.load_state_dict(state["scaler"])

    def load_ema(self, ema: dict[str, torch.Tensor]) -> None:
        self.ema.module.load_state_dict(_rewrap_keys(ema, self.ema.module.state_dict()))


def _rewrap_keys(state: dict[str, torch.Tensor], target: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Map plain keys back onto a (possibly activation-checkpointed) module's keys."""
    by_clean = {clean_key(k): k for k in target}
    return {by_clean.get(k, k): v for k, v in state.items()}


class DeepSpeedStrategy(Strategy):
    """ZeRO 1/2/3 through Accelerate's DeepSpeed plugin; ``self.model`` is the DeepSpeedEngine.

    Gradient accumulation: the engine's gradient_accumulation_steps is train.grad_accum_steps, and the loop's
    ``no_sync`` tells the engine which micro-batch ends the window (``set_gradient_accumulation_boundary``), so
    ZeRO-1 reduces once, at the last micro-batch, and ZeRO-2/3 reduce-scatter every micro-batch into their
    partition. With the boundary set explicitly the engine needs no ``step`` per micro-batch: ``step`` runs once
    per window, as under DDP (DeepSpeed's documented pattern for this). The loop divides the loss by the number of
    micro-batches itself, so ``backward`` keeps the engine from dividing it again (scale_wrt_gas=False)."""

    name = "zero"

    def prepare(self) -> None:
        self.model, self.opt = self.accelerator.prepare(self.model, self.opt)
        self.engine = self.model
        self.stage = self.engine.zero_optimization_stage()
        self.accumulated = 0  # micro-batches backpropagated since the last optimizer step

    @contextmanager
    def no_sync(self, accumulating: bool) -> Iterator[None]:
        self.engine.set_gradient_accumulation_boundary(not accumulating)
        try:
            yield
        finally:
            self.engine.set_gradient_accumulation_boundary(True)  # between micro-batches: a boundary, as gas=1

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already divided by train.grad_accum_steps
        self.accumulated += 1

    def clip_and_norm(self) -> float | None:
        return None  # DeepSpeed clips inside engine.step(); the norm is known after it (last_grad_norm)

    def step(self) -> None:
        self.engine.step()  # at the boundary: clip (gradient_clipping) + optimizer step + zero grads
        self.accumulated = 0
        norm = self.engine.get_global_grad_norm()
        self.last_grad_norm = float(norm) if norm is not None else float("nan")

    def skip(self) -> None:
        if self.accumulated:  # a window cut short: drop what the engine accumulated, not just param.grad
            self._drop_accumulated()
        self.accumulated = 0
        self.engine.zero_grad()
        if hasattr(self.engine.optimizer, "zero_grad"):
            self.engine.optimizer.zero_grad(set_to_none=True)

    def _drop_accumulated(self) -> None:
        """Forget the gradients of the window's earlier micro-batches, so the next window starts from none, the
        way the ZeRO optimizers clean up after a skipped (overflowed) step; weights and optimizer state stay."""
        opt = self.engine.optimizer
        if self.stage == 3:  # DeepSpeedZeroOptimizer_Stage3: micro_step_id 0 = the next micro-batch overwrites
            opt.zero_grad(set_to_none=True)
            if opt.offload_optimizer:
                opt.reset_cpu_buffers()
            else:
                opt.averaged_gradients = {}
            return
        # DeepSpeedZeroOptimizer (stages 1, 2): as its step() does on overflow, plus the reduced partial sums
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

        opt.micro_step_id = INITIAL_MICRO_STEP_ID  # the next micro-batch copies instead of accumulating
        opt.zero_grad(set_to_none=True)
        opt._release_preflattened_grad_buffers()
        if opt.cpu_offload:
            opt.reset_cpu_buffers()
            opt._offload_accumulated_param_ids = set()
        for grads in (opt.averaged_gradients, opt.all_grad_tensors):
            for k in grads:
                grads[k] = None

    def _gathered(self) -> Any:
        if self.stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        return nullcontext()

    def update_ema(self, step: int) -> None:
        with self._gathered():  # ZeRO-3: the full parameters, for a full EMA replica on every rank
            self.ema.update(self.engine.module, step=step)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        with self._gathered():
            return {clean_key(k): v.detach().clone() for k, v in self.engine.module.state_dict().items()}

    def save(self, ckpt: Path) -> dict[str, Any]:
        self.engine.save_checkpoint(str(ckpt / "deepspeed"), tag="state", save_latest=False)
        return {"model": self.model_state_dict()}

    def load(self, ckpt: Path, state: dict[str, Any]) -> None:
        path, _ = self.engine.load_checkpoint(str(ckpt / "deepspeed"), tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state in {ckpt / 'deepspeed'}: was it written by strategy "
                                    f"{self.cfg.strategy}?")


class FSDPStrategy(Strategy):
    """torch FSDP2: ``fully_shard`` on every block, then the root, on a (replicate, shard) device mesh.

    The EMA model is sharded the same way, so its update is a shard-local lerp (no gathers) and it costs
    1/N of a model per rank. Checkpoints use torch.distributed.checkpoint (one file per rank)."""

    name = "fsdp"

    def wrap(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        world = dist.get_world_size()
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        if self.cfg.fsdp_shard == "hybrid":  # shard within a node, replicate across nodes
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            mesh = init_device_mesh(device_type, (world // local, local), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
        kwargs: dict[str, Any] = {"mesh": mesh}
        if self.cfg.offload_params and device_type == "cuda":
            kwargs["offload_policy"] = CPUOffloadPolicy()
        elif self.cfg.offload_params:
            log.info("train.offload_params: the parameters already live on the CPU (no GPU); nothing to offload")
        model.to(self.device)
        self.ema.module.to(self.device)
        for m in (model, self.ema.module):
            for block in m.blocks:
                fully_shard(block, **kwargs)
            fully_shard(m, **kwargs)
        return model, model

    def prepare(self) -> None:  # Accelerate must not wrap an FSDP2 module in DDP
        pass

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # FSDP2 reduce-scatters (averages) the gradients

    @contextmanager
    def no_sync(self, accumulating: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(not accumulating)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def clip_and_norm(self) -> float | None:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def update_ema(self, step: int) -> None:
        self.ema.update(self.model, step=step)  # DTensor shards on both sides: a local lerp

    def _full(self, module: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {clean_key(k): v for k, v in sd.items()}

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return self._full(self.model)

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        return self._full(self.ema.module)

    def save(self, ckpt: Path) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        dcp.save({"model": model_sd, "optim": optim_sd, "ema": get_model_state_dict(self.ema.module)},
                 checkpoint_id=str(ckpt / "fsdp"))
        return {"model": self.model_state_dict()}

    def load(self, ckpt: Path, state: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_state_dict,
            set_model_state_dict,
            set_state_dict,
        )

        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        sharded = {"model": model_sd, "optim": optim_sd, "ema": get_model_state_dict(self.ema.module)}
        dcp.load(sharded, checkpoint_id=str(ckpt / "fsdp"))
        set_state_dict(self.model, self.opt, model_state_dict=sharded["model"], optim_state_dict=sharded["optim"])
        set_model_state_dict(self.ema.module, sharded["ema"])

    def load_ema(self, ema: dict[str, torch.Tensor]) -> None:
        pass  # restored from the sharded checkpoint in load()


def build_strategy(accelerator: Accelerator, model: nn.Module, cfg: TrainConfig) -> Strategy:
    """Wrap ``model`` (already activation-checkpointed / compiled as configured) for ``cfg.strategy``."""
    if cfg.strategy.startswith("zero"):
        return DeepSpeedStrategy(accelerator, model, cfg)
    if cfg.strategy == "fsdp":
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("train.strategy=fsdp needs a process group: launch with torchrun or accelerate "
                               "launch (also for 1 process), e.g. torchrun --nproc_per_node 2 -m dit.cli train ...")
        return FSDPStrategy(accelerator, model, cfg)
    return Strategy(accelerator, model, cfg)
