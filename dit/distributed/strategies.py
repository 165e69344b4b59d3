"""Data-parallel strategies, chosen by ``train.strategy`` and applied from outside the model (parallelize.py):

    ddp     torch DistributedDataParallel over N processes (none for one process)
    zero1   DeepSpeed ZeRO stage 1 (optimizer states sharded)
    zero2   ... stage 2 (+ gradients sharded);        train.offload_optimizer moves them to CPU
    zero3   ... stage 3 (+ parameters sharded);       train.offload_params too
    fsdp    torch FSDP2 ``fully_shard`` per block + root on a device mesh (train.fsdp_shard: full | hybrid)

Each wraps the model with the framework's own public API (DDP, ``deepspeed.initialize``, ``fully_shard``); Accelerate
only launches the processes. The loop talks to all of them through the same few calls: ``autocast``, ``no_sync``,
``backward``, ``step`` (which reports the global gradient norm and applies the update only when it is finite),
``update_ema``, the gathered ``model_state_dict`` / ``ema_state_dict`` for exports, and ``save`` / ``load`` of the
(possibly sharded) model + optimizer state in a checkpoint directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dit.config import TrainConfig
from dit.distributed.setup import DistEnv
from dit.distributed.zero_ema import (
    Fragment,
    PartitionedEma,
    filled_block_by_block,
    gathered_block_by_block,
    master_fragments,
)
from dit.training.ema import ModelEma

log = logging.getLogger("dit.strategies")

DEEPSPEED_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
MakeOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextmanager
def live_eval(module: nn.Module) -> Iterator[None]:
    """The live model in eval mode (no dropout) while it samples, then back as it was."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


@dataclass
class StepReport:
    grad_norm: float  # global 2-norm of the gradients before clipping, the same on every rank (non-finite: skipped)
    applied: bool  # whether the weights and optimizer state were updated


class Strategy:
    """DDP (also the single-process path). Subclasses change only what differs."""

    name = "ddp"
    keep: Callable[[str], bool] | None = None  # which state-dict keys checkpoints hold (LoRA: the adapter); None: all

    def __init__(self, model: nn.Module, env: DistEnv, cfg: TrainConfig, *, ema: ModelEma | None,
                 make_optimizer: MakeOptimizer, mixed_precision: str = "no") -> None:
        self.env, self.cfg, self.ema, self.mixed_precision = env, cfg, ema, mixed_precision  # ema None: train.ema off
        self.module = model  # the plain model: its parameters, state dict and config
        self.model = self.wrap(model)  # what the loop calls for the forward pass
        self.optimizer = self.build_optimizer(make_optimizer)  # the torch optimizer (the LR schedule drives it)

    # --- setup
    def wrap(self, model: nn.Module) -> nn.Module:
        model.to(self.env.device)
        if self.ema:
            self.ema.module.to(self.env.device)
        fp16 = self.mixed_precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.env.device.type) if fp16 else None  # fp16: dynamic loss scaling
        if self.env.world_size == 1:
            return model
        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        # gradients as views into DDP's all-reduce buckets: one fp32 copy of them per rank, not two
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)

    def build_optimizer(self, make_optimizer: MakeOptimizer) -> torch.optim.Optimizer:
        return make_optimizer(self.module.parameters())

    # --- one step
    def autocast(self) -> AbstractContextManager:
        dtype = DTYPES.get(self.mixed_precision)
        # no cast cache: each weight is used once per forward, so caching saves no cast, and it would hold a half
        # copy of every trained weight until the forward ends, recomputed (checkpointed) blocks' included
        return torch.autocast(self.env.device.type, dtype=dtype, cache_enabled=False) if dtype else nullcontext()

    def no_sync(self, accumulating: bool) -> AbstractContextManager:
        """While ``accumulating`` (a micro-batch before the last), keep gradients local: no all-reduce."""
        return self.model.no_sync() if accumulating and self.model is not self.module else nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def grad_norm(self) -> float:
        """Clip to train.grad_clip; the global norm before clipping (DDP: gradients are already all-reduced)."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        return float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip))

    def step(self) -> StepReport:
        """Clip and update when the global gradient norm is finite; otherwise drop the gradients and leave weights
        and optimizer state as they were. Every rank takes the same decision (the norm is global)."""
        norm = self.grad_norm()
        applied = math.isfinite(norm)
        if applied:
            self.scaler.step(self.optimizer) if self.scaler else self.optimizer.step()
        if self.scaler:
            self.scaler.update()  # (a non-finite fp16 step also lowers the loss scale)
        self.optimizer.zero_grad(set_to_none=True)
        return StepReport(norm, applied)

    def update_ema(self, step: int) -> None:
        if self.ema:
            self.ema.update(self.module, step=step)

    @property
    def sampled(self) -> nn.Module:
        """The plain model samples are drawn with and validation's EMA pass reads: the EMA model, or with
        train.ema=false the live one."""
        return self.ema.module if self.ema else self.module

    def sampling(self) -> AbstractContextManager:
        """What sampling with ``sampled`` needs around it (ZeRO: the EMA filled in; the live model: eval mode)."""
        return nullcontext() if self.ema else live_eval(self.module)

    # --- state
    def local_params(self) -> dict[str, float]:
        """This rank's own copy of the parameters: element count and float64 sum, and the EMA's element count.
        Replicated strategies give the same numbers on every rank; sharded ones about 1/N of the elements each (tests
        check both)."""
        numel, total = 0, 0.0
        for p in self.module.parameters():
            local = self.local_tensor(p)
            numel += local.numel()
            total += float(local.detach().double().sum())
        return {"numel": numel, "sum": total, "ema_numel": self.local_ema()}

    def local_tensor(self, p: nn.Parameter) -> torch.Tensor:
        return p.data

    def local_ema(self) -> int:
        """Elements of the EMA this rank holds between reads (a LoRA run's shared base not counted): the whole
        model under DDP, about 1/N of it under FSDP and DeepSpeed (tests check both)."""
        return sum(self.local_tensor(p).numel() for p in self.ema_own_params())

    def ema_own_params(self) -> list[nn.Parameter]:
        """The EMA model's parameters that are not the model's own (a LoRA run's shared base); none without one."""
        if not self.ema:
            return []
        shared = {id(p) for p in self.module.parameters()}
        return [p for p in self.ema.module.parameters() if id(p) not in shared]

    def ema_starts_over(self, state: dict[str, Any]) -> bool:
        """Whether this run keeps an EMA but the checkpoint it resumes has none (written with train.ema=false): the
        EMA then starts from the resumed weights."""
        if self.ema and "ema" not in state:
            if self.env.is_main:
                log.warning("the checkpoint holds no EMA (train.ema=false when it was written): the EMA starts from "
                            "its weights")
            return True
        return False

    def kept(self, state: dict[str, Any]) -> dict[str, Any]:
        return state if self.keep is None else {k: v for k, v in state.items() if self.keep(k)}

    def load_kept(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint's (kept) state: every key when all are kept, else exactly the kept ones."""
        missing, unexpected = module.load_state_dict(state, strict=self.keep is None)
        lost = [k for k in missing if self.keep is not None and self.keep(k)]
        if lost or unexpected:
            raise RuntimeError(f"checkpoint state does not fit the model: missing {lost[:3]}, unexpected "
                               f"{unexpected[:3]}")

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights (plain DiT keys; only the kept ones), on rank 0 at least; a collective under
        sharding."""
        return self.kept(dict(self.module.state_dict()))

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """What checkpoints export: the EMA weights (the live ones with train.ema=false)."""
        if not self.ema:
            return self.model_state_dict()
        return self.kept(dict(self.ema.module.state_dict()))

    def save(self, ckpt: Path) -> dict[str, Any]:
        """Write sharded state under ``ckpt`` (every rank calls this); return what goes into training_state.pt
        (the loop adds the EMA weights it gathered for the export). ``load`` restores both."""
        state = {"optimizer": self.optimizer.state_dict(), "model": self.model_state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load(self, ckpt: Path, state: dict[str, Any]) -> None:
        self.load_kept(self.module, state["model"])
        if self.ema_starts_over(state):
            self.ema.module.load_state_dict(self.module.state_dict())
        elif self.ema:
            self.load_kept(self.ema.module, state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def deepspeed_json(cfg: TrainConfig, stage: int) -> Path:
    """train.deepspeed_config, or the packaged configs/deepspeed/zero{stage}.json."""
    return Path(cfg.deepspeed_config) if cfg.deepspeed_config else DEEPSPEED_CONFIGS / f"zero{stage}.json"


def deepspeed_config(cfg: TrainConfig, mixed_precision: str) -> dict[str, Any]:
    """configs/deepspeed/zero{N}.json (or train.deepspeed_config), with the batch, clipping, precision and
    offload settings taken from the experiment config so the two never disagree."""
    stage = int(cfg.strategy[-1])
    ds = json.loads(deepspeed_json(cfg, stage).read_text())
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum_steps
    ds.pop("train_batch_size", None)
    ds["gradient_clipping"] = cfg.grad_clip
    ds["bf16"] = {"enabled": mixed_precision == "bf16"}
    ds["fp16"] = {"enabled": mixed_precision == "fp16", "loss_scale": 0, "initial_scale_power": 16}
    ds.setdefault("steps_per_print", 10**9)  # the loop logs; DeepSpeed's own step lines would repeat it
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


class DeepSpeedStrategy(Strategy):
    """ZeRO 1/2/3: ``self.model`` is the DeepSpeedEngine, built by ``deepspeed.initialize`` with our AdamW.

    Gradient accumulation: the loop's ``no_sync`` tells the engine which micro-batch ends the window
    (``set_gradient_accumulation_boundary``), so ZeRO-1 reduces once, at the last micro-batch, and ZeRO-2/3
    reduce-scatter every micro-batch into their partition; ``step`` runs once per window, as under DDP. The loop
    divides the loss by the number of micro-batches itself (``scale_wrt_gas=False``).
    Non-finite gradients: the ZeRO optimizers check the global norm before updating and skip the step, clearing
    what was accumulated, when it is not finite; ``step`` reports that through the engine's public
    ``was_step_applied`` and ``get_global_grad_norm`` (tests/distributed/test_nonfinite.py holds DeepSpeed to it)."""

    name = "zero"

    def wrap(self, model: nn.Module) -> nn.Module:
        self.scaler = None  # DeepSpeed scales fp16 losses itself
        if self.ema:
            self.ema.module.to(self.env.device)  # (before ZeRO-3 partitions a LoRA run's base, which it shares)
        return model  # wrapped with its optimizer, in build_optimizer

    def build_optimizer(self, make_optimizer: MakeOptimizer) -> torch.optim.Optimizer:
        import deepspeed

        optimizer = make_optimizer(self.module.parameters())
        config = deepspeed_config(self.cfg, self.mixed_precision)
        self.model, _, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer, config=config)
        self.stage = self.model.zero_optimization_stage()
        # the EMA partitioned like the masters it averages, from their starting values (dit/distributed/zero_ema.py);
        # its model's trained parameters stay empty (build_ema(partitioned=True) never copied them) between reads
        if self.ema:
            frags = self._fragments()
            self.partitioned = PartitionedEma(frags, self.env.device)
            self.partitioned.release(dict(self.ema.module.named_parameters()), frags)
        # the samples' precision: the EMA model is filled in bf16 for a bf16 run's samples and validation (autocast
        # casts the weights it multiplies to bf16 anyway), fp32 otherwise
        self.read_dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float32
        return optimizer

    @contextmanager
    def no_sync(self, accumulating: bool) -> Iterator[None]:
        self.model.set_gradient_accumulation_boundary(not accumulating)
        try:
            yield
        finally:
            self.model.set_gradient_accumulation_boundary(True)  # between micro-batches: a boundary, as gas=1

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # the loop already divided by train.grad_accum_steps

    def step(self) -> StepReport:
        self.model.step()  # at the boundary: norm, then (if finite) clip + optimizer step; zero grads
        norm = self.model.get_global_grad_norm()
        applied = self.model.was_step_applied()
        return StepReport(float(norm) if norm is not None else float("nan"), applied)

    def _gathered(self) -> AbstractContextManager:
        if self.stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)
        return nullcontext()

    def _fragments(self) -> list[Fragment]:
        return master_fragments(self.module, self.stage, getattr(self.model.optimizer, "dp_process_group", None))

    def update_ema(self, step: int) -> None:
        # each rank its own partition of the fp32 masters (dit/distributed/zero_ema.py)
        if self.ema:
            self.partitioned.update(self._fragments(), 1.0 - self.ema.get_decay(step))

    @contextmanager
    def sampling(self) -> Iterator[None]:
        """The EMA model filled in from the ranks' partitions (in the samples' precision) one block at a time, in
        each block's forward; ZeRO-3: its partitioned parameters (a LoRA run's shared base) gathered the same way.
        (The live model, train.ema=false: in eval mode; ZeRO-3's own hooks gather its weights.)"""
        if not self.ema:
            with live_eval(self.module):
                yield
            return
        with filled_block_by_block(self.partitioned, self.ema.module, self._fragments(), self.read_dtype):
            if self.stage == 3 and self.ema.shared:
                with gathered_block_by_block(self.ema.module):
                    yield
            else:
                yield

    def local_ema(self) -> int:
        # its partition, and what it holds whole (frozen layers not shared; the trained ones are empty here)
        return (self.partitioned.numel() if self.ema else 0) + sum(p.numel() for p in self.ema_own_params())

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA in fp32, put together one parameter at a time on rank 0's CPU (the other ranks get {})."""
        if not self.ema:
            return self.model_state_dict()
        trained = self.partitioned.state(self._fragments(), keep=self.env.is_main)
        if not self.env.is_main:
            return {}
        return self.kept({k: trained.get(k, v) for k, v in self.ema.module.state_dict().items()})

    def local_tensor(self, p: nn.Parameter) -> torch.Tensor:
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param

            local = safe_get_local_fp32_param(p)  # this rank's partition of the fp32 master weights
            # a frozen parameter (LoRA's base) has no master copy: its partition of the module's weights
            return local if local is not None else p.ds_tensor
        return p.data

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        with self._gathered():
            return self.kept({k: v.detach().clone() for k, v in self.module.state_dict().items()})

    def save(self, ckpt: Path) -> dict[str, Any]:
        self.model.save_checkpoint(str(ckpt / "deepspeed"), tag="state", save_latest=False,
                                   exclude_frozen_parameters=self.keep is not None)
        return {"model": self.model_state_dict()}

    def load(self, ckpt: Path, state: dict[str, Any]) -> None:
        path, _ = self.model.load_checkpoint(str(ckpt / "deepspeed"), tag="state", load_optimizer_states=True,
                                             load_lr_scheduler_states=False, load_module_strict=self.keep is None)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state in {ckpt / 'deepspeed'}: was it written by strategy "
                                    f"{self.cfg.strategy}?")
        if not self.ema:
            return
        frags = self._fragments()
        if self.ema_starts_over(state):
            self.partitioned = PartitionedEma(frags, self.env.device)  # (from the masters just loaded)
            return
        ema = state["ema"]
        lost = [f.name for f in frags if f.name not in ema]
        if lost:
            raise RuntimeError(f"checkpoint EMA does not fit the model: missing {lost[:3]}")
        self.partitioned.load(frags, ema)
        trained = {f.name for f in frags}
        rest = {k: v for k, v in ema.items() if k not in trained}
        unexpected = sorted(set(rest) - set(self.ema.module.state_dict()))
        if unexpected:
            raise RuntimeError(f"checkpoint EMA does not fit the model: unexpected {unexpected[:3]}")
        self.ema.module.load_state_dict(rest, strict=False)


class FSDPStrategy(Strategy):
    """torch FSDP2: ``fully_shard`` on every block, then the root, on a (replicate, shard) device mesh.

    The EMA model is sharded the same way, so its update is a shard-local lerp (no gathers) and it costs
    1/N of a model per rank. Checkpoints use torch.distributed.checkpoint (one file per rank)."""

    name = "fsdp"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        self.scaler = None  # (fp16 is refused for fsdp by the config)
        world, device_type = self.env.world_size, self.env.device.type
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
        for m in (model, *([self.ema.module] if self.ema else [])):
            m.to(self.env.device)
            # the trained model gathers its weights in the run's half precision: autocast would otherwise keep a
            # bf16 copy of every gathered (unsharded) weight for the backward, a whole model per rank
            mp = {"mp_policy": self.mixed_precision_policy()} if m is model and self.mixed_precision in DTYPES else {}
            for block in m.blocks:
                fully_shard(block, **kwargs, **mp)
            fully_shard(m, **kwargs, **mp)
        return model

    def mixed_precision_policy(self) -> Any:
        """Compute in the half dtype, reduce gradients in fp32 into the fp32 shards; inputs are left as they come
        (autocast casts what it computes in half precision; timesteps and RoPE tables stay fp32)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=DTYPES[self.mixed_precision], reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)

    @contextmanager
    def no_sync(self, accumulating: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(not accumulating)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def grad_norm(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def local_tensor(self, p: nn.Parameter) -> torch.Tensor:
        return p.to_local() if hasattr(p, "to_local") else p.data  # the DTensor's shard

    def _full(self, module: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return self.kept(self._full(self.module))

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        return self.kept(self._full(self.ema.module)) if self.ema else self.model_state_dict()

    def save(self, ckpt: Path) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        sharded = {"model": self.kept(model_sd), "optim": optim_sd}
        if self.ema:
            sharded["ema"] = self.kept(get_model_state_dict(self.ema.module))
        dcp.save(sharded, checkpoint_id=str(ckpt / "fsdp"))
        return {"model": self.model_state_dict()}

    def load(self, ckpt: Path, state: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_state_dict,
            set_model_state_dict,
            set_state_dict,
        )

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        sharded = {"model": self.kept(model_sd), "optim": optim_sd}
        starts_over = self.ema_starts_over(state)
        if self.ema and not starts_over:
            sharded["ema"] = self.kept(get_model_state_dict(self.ema.module))
        dcp.load(sharded, checkpoint_id=str(ckpt / "fsdp"))
        options = StateDictOptions(strict=self.keep is None)
        set_state_dict(self.module, self.optimizer, model_state_dict=sharded["model"],
                       optim_state_dict=sharded["optim"], options=options)
        if self.ema:  # (a checkpoint without an EMA: the EMA starts from the weights just loaded)
            set_model_state_dict(self.ema.module, sharded["model" if starts_over else "ema"], options=options)


def build_strategy(model: nn.Module, env: DistEnv, cfg: TrainConfig, *, ema: ModelEma | None,
                   make_optimizer: MakeOptimizer, mixed_precision: str = "no") -> Strategy:
    """Wrap ``model`` (already activation-checkpointed / compiled as configured) for ``cfg.strategy``."""
    cls = DeepSpeedStrategy if cfg.strategy.startswith("zero") else FSDPStrategy if cfg.strategy == "fsdp" else Strategy
    if cls is not Strategy and not dist.is_initialized():
        raise RuntimeError(f"train.strategy={cfg.strategy} needs a process group: setup_distributed(needs_group=True)")
    return cls(model, env, cfg, ema=ema, make_optimizer=make_optimizer, mixed_precision=mixed_precision)
