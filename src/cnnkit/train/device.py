"""Hardware choices: the device, the precision, the memory layout and ``torch.compile``.

Mixed precision (bf16 autocast where the hardware runs it fast), channels_last where that is
faster, ``torch.compile`` where the run is long enough to repay the compilation.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

from cnnkit.train.config import TrainConfig, parse_dropblock

# torch.compile costs tens of seconds (C++ / Triton code generation) and saves a fraction of
# each step: below this many steps it does not pay for itself. Measured on a 2-core AMX Xeon,
# ResNet-56, batch 128, bf16 + channels_last (torch 2.13): compiling forward + backward takes
# ~95 s with a cold inductor cache and ~7 s warm (FX graph + AOTAutograd caches, on by default,
# under /tmp/torchinductor_<user> or $TORCHINDUCTOR_CACHE_DIR), and saves ~80-100 ms of a
# ~400 ms eager step: break-even ~1000 steps cold, ~100 warm. The cache state is not known
# before tracing, so the threshold assumes a cold cache, with a margin.
COMPILE_MIN_STEPS = 2000


def wants_cuda(spec: str) -> bool:
    """Whether ``--device spec`` asks for CUDA (``auto`` does where CUDA is available)."""
    return spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available())


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's GPU when CUDA is available, else the CPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: CUDA is not available on this machine")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) here")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    return device


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX-BF16 or AVX512-BF16).

    Without them bf16 is emulated and slower than fp32. Read from /proc/cpuinfo's flags, with
    PyTorch's own dispatch level (which names AMX where it uses it) as a fallback.
    """
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    if "AMX" in capability or "BF16" in capability:
        return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(spec: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where it runs fast (CUDA with bf16, CPU with AMX/AVX512-BF16)."""
    if spec != "auto":
        return spec
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def resolve_channels_last(spec: str, device: torch.device, precision: str) -> bool:
    """``auto`` -> channels_last (NHWC) everywhere: it is what cuDNN's tensor cores and oneDNN's
    bf16 kernels want, and on this AVX2 CPU in fp32 it trained ResNet-56 (batch 128) at 152 img/s
    against 131 img/s for NCHW, eager, interleaved on an idle machine; ``precision`` is kept for
    callers that decide per precision.
    """
    if spec != "auto":
        return spec == "on"
    return True


def resolve_compile(cfg: TrainConfig, device: torch.device, total_steps: int) -> bool:
    """``auto`` -> compile unless the run is too short to repay it (fewer than
    ``COMPILE_MIN_STEPS`` steps), DropBlock's per-step ramp would recompile, or
    ``--deterministic`` asks for the plain kernels."""
    if cfg.compile != "auto":
        return cfg.compile == "on"
    if cfg.deterministic or parse_dropblock(cfg.dropblock)[0] > 0:
        return False
    if not hasattr(torch, "compile") or sys.platform == "win32":
        return False
    return total_steps >= COMPILE_MIN_STEPS


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast on ``device`` when ``precision`` is ``"bf16"``, a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def resolve_numerics(cfg: TrainConfig, device: torch.device) -> tuple[str, bool]:
    """``(precision, channels_last)`` for ``device``; a warning for bf16 where it is emulated."""
    precision = resolve_precision(cfg.precision, device)
    if precision == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn(
            "--precision bf16 on a CPU without AMX/AVX512-BF16: bf16 is emulated and slow",
            stacklevel=3,
        )
    return precision, resolve_channels_last(cfg.channels_last, device, precision)


def set_determinism(cfg: TrainConfig, device: torch.device) -> None:
    """Threads (``--threads``), deterministic kernels (``--deterministic``) or cuDNN's
    autotuner (the fastest convolution algorithms, chosen by timing, when not deterministic)."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
