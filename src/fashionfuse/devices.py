"""Where a process computes and in which dtypes: plain functions of a `Capability` record.

Every choice that depends on the hardware (the compute dtype `auto` resolves to, whether the
forward runs under autocast and with loss scaling, whether FlashAttention-2 can be used, the
dtype packed attention runs in, the process's device and collective backend under a launcher)
is made here from one record, so the GPU policy is tested on a CPU with made-up records.
`detect(device)` builds the record of the machine at hand.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

# FlashAttention-2 supports Ampere (sm_80) and newer GPUs; bfloat16 is native from sm_80 too
AMPERE = (8, 0)
# set to `gloo` to run a torchrun job on the CPU (and gloo) although CUDA is visible
BACKEND_ENV = "FASHIONFUSE_DIST_BACKEND"


@dataclass(frozen=True)
class Capability:
    """What the device of a process can do, as far as fashionfuse's choices go."""

    kind: str  # "cuda", "cpu", or another torch device type
    bf16_native: bool  # matmuls in bfloat16 at full speed (not emulated)
    cuda_arch: tuple[int, int] | None = None  # compute capability (major, minor) on CUDA
    flash_attn: bool = False  # the flash_attn package imports
    name: str = ""  # the device's name, for reports

    @property
    def cuda(self) -> bool:
        return self.kind == "cuda"


def detect(device: str | None = None) -> Capability:
    """The record of `device` (default: this process's device, `process_device()`)."""
    device = device or process_device()
    kind = torch.device(device).type
    if kind == "cuda" and torch.cuda.is_available():
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        arch = torch.cuda.get_device_capability(index)
        return Capability("cuda", bf16_native=arch >= AMPERE, cuda_arch=arch,
                          flash_attn=_flash_attn_installed(),
                          name=torch.cuda.get_device_name(index))
    if kind == "cpu":
        return Capability("cpu", bf16_native=cpu_has_native_bf16(), name="cpu")
    return Capability(kind, bf16_native=True, name=kind)


@functools.cache
def _flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- dtypes
def compute_dtype_for(requested: str, cap: Capability) -> str:
    """`quantization.compute_dtype` resolved: the configured one, or for `auto` bfloat16 where
    the device computes in it natively (CUDA from Ampere, CPUs with AVX512-BF16 or AMX), float16
    on older GPUs (T4, V100: their bfloat16 is emulated), float32 on other CPUs."""
    if requested != "auto":
        return requested
    if cap.cuda:
        return "bfloat16" if cap.bf16_native else "float16"
    if cap.kind == "cpu":
        return "bfloat16" if cap.bf16_native else "float32"
    return "bfloat16"


@dataclass(frozen=True)
class Precision:
    """How a training forward runs: under autocast to `autocast_dtype` (None: no autocast), and
    with dynamic loss scaling (float16 autocast, whose small gradients underflow otherwise)."""

    autocast_dtype: str | None
    loss_scaling: bool

    def describe(self) -> str:
        if self.autocast_dtype is None:
            return "no autocast"
        return f"{self.autocast_dtype} autocast" + (" with loss scaling" if self.loss_scaling
                                                     else "")


def training_precision(compute_dtype: str, cap: Capability, autocast: bool | None) -> Precision:
    """The QLoRA recipe (HF `Trainer` with `bf16=True`): on CUDA the forward runs under autocast
    to the compute dtype over float32 LoRA weights and optimiser state, with loss scaling for
    float16. `autocast` None (auto) takes it on CUDA only; True asks for it anywhere the
    compute dtype is 16-bit (bfloat16 on a CPU); False never."""
    if compute_dtype == "float32" or autocast is False:
        return Precision(None, False)
    if autocast is None and not cap.cuda:
        return Precision(None, False)
    if compute_dtype == "float16" and not cap.cuda:
        return Precision(None, False)  # CPU autocast is bfloat16 only
    return Precision(compute_dtype, compute_dtype == "float16")


def attention_dtype(input_dtype: torch.dtype, cap: Capability, compute_dtype: str
                    ) -> torch.dtype:
    """The dtype packed attention runs in. On CUDA, float32 inputs (the residual stream of a
    k-bit model prepared for training) are cast to the 16-bit compute dtype: SDPA's flash and
    cuDNN kernels take 16-bit inputs only, and float32 would leave the math kernel, which
    materialises a float32 [heads, L, L] score matrix. Elsewhere, or with a float32 compute
    dtype asked for, the inputs' own dtype."""
    if cap.cuda and input_dtype == torch.float32 and compute_dtype != "float32":
        return torch.float16 if compute_dtype == "float16" else torch.bfloat16
    return input_dtype


def flash_attention_usable(cap: Capability) -> bool:
    """FlashAttention-2's varlen kernel: installed, on an Ampere or newer GPU."""
    return cap.cuda and cap.flash_attn and cap.cuda_arch is not None and cap.cuda_arch >= AMPERE


def gap_dropout_suits(cap: Capability) -> bool:
    """Whether LoRA dropout is drawn as its dropped positions (`adapters/dropout.py`): a win on
    CPUs, where a draw per element is slow; on a GPU the per-element mask is cheap and the
    positions' variable count would read the device (a host sync) in every LoRA layer."""
    return not cap.cuda


# --------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class Placement:
    """A process's device and, under a launcher, the collective backend of its group."""

    device: str
    backend: str | None  # None: a world of one process


def placement(env: dict[str, str], cuda_available: bool, device_count: int) -> Placement:
    """Where this process computes: under torchrun/accelerate (WORLD_SIZE > 1) its own GPU
    `cuda:LOCAL_RANK` with NCCL, or the CPU with gloo when CUDA is not visible or
    `FASHIONFUSE_DIST_BACKEND=gloo` asks for it (e.g. two processes on a one-GPU machine)."""
    from .errors import UserError

    size = int(env.get("WORLD_SIZE", "1"))
    forced = env.get(BACKEND_ENV, "").strip().lower() or None
    if forced not in (None, "gloo", "nccl"):
        raise UserError(f"{BACKEND_ENV}={env[BACKEND_ENV]}: use gloo or nccl")
    use_cuda = cuda_available and forced != "gloo"
    if forced == "nccl" and not cuda_available:
        raise UserError(f"{BACKEND_ENV}=nccl but no CUDA device is visible")
    if size <= 1:
        return Placement("cuda" if use_cuda else "cpu", None)
    if not use_cuda:
        return Placement("cpu", "gloo")
    local = int(env.get("LOCAL_RANK", "0"))
    if local >= device_count:
        raise UserError(f"LOCAL_RANK={local} but {device_count} CUDA device(s) are visible: "
                        f"launch at most {device_count} processes per node, or set "
                        f"{BACKEND_ENV}=gloo to run them on the CPU")
    return Placement(f"cuda:{local}", "nccl")


def process_placement() -> Placement:
    """`placement` for this process's environment and hardware."""
    cuda = torch.cuda.is_available()
    return placement(dict(os.environ), cuda, torch.cuda.device_count() if cuda else 0)


def process_device() -> str:
    """This process's device (see `placement`); sets it as the current CUDA device."""
    device = process_placement().device
    if device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))
    return device


# --------------------------------------------------------------------------- CPU flags
def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bfloat16 matmul instructions (AVX512-BF16 or AMX-BF16), read from
    the flags of `cpuinfo` or /proc/cpuinfo (False where that file does not exist)."""
    flags = _cpu_flags() if cpuinfo is None else _parse_cpu_flags(cpuinfo)
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """This machine's CPU flags, read once per process."""
    try:
        return _parse_cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


def _parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    return frozenset(flag for line in cpuinfo.splitlines() if line.startswith("flags")
                     for flag in line.split(":", 1)[1].split())
