"""Speed choices that depend on the machine: the attention kernel and the compute precision.

One place decides, for a device and a requested setting, which attention implementation a
backbone is built with (``eager`` or ``sdpa``) and which precision actually runs (bf16 autocast
only where the CPU has native bf16 instructions; otherwise fp32 with one line saying why), so
that training, evaluation and ``eebench bench`` make the same choice and record it.
"""

from __future__ import annotations

import functools
import platform
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from eebench.errors import EebenchError

ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa")
PRECISIONS = ("fp32", "bf16", "fp16")

# CPU flags (as /proc/cpuinfo spells them) that give bf16 matrix products in hardware.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Flags worth recording next to a timing: they decide which kernels oneDNN can use.
_REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")


@dataclass(frozen=True)
class CpuInfo:
    """The machine's CPU as far as speed choices care: its model name and the relevant flags."""

    model: str
    flags: tuple[str, ...]  # the subset of _REPORTED_FLAGS the CPU has
    native_bf16: bool  # avx512_bf16 or AMX bf16: bf16 matmuls run in hardware
    # "family F model M stepping S" (x86 /proc/cpuinfo): the kind of CPU where a virtual machine's
    # model name is generic ("AMD EPYC" names Zen 1 and Zen 4 alike); "" where unknown
    signature: str = ""

    def as_dict(self) -> dict:
        return {"cpu_model": self.model, "cpu_signature": self.signature, "cpu_flags": list(self.flags),
                "native_bf16": self.native_bf16, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _proc_cpuinfo() -> tuple[str, set[str], str]:
    model, flags, ids = "", set(), {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                elif key in ("cpu family", "model", "stepping") and key not in ids:
                    ids[key] = value.strip()
    except OSError:  # not Linux: fall back to what torch can tell
        pass
    signature = (f"family {ids['cpu family']} model {ids['model']} stepping {ids.get('stepping', '?')}"
                 if "cpu family" in ids and "model" in ids else "")
    return model, flags, signature


@functools.cache
def cpu_info() -> CpuInfo:
    """Model name and bf16-relevant flags of this CPU (Linux: /proc/cpuinfo; elsewhere torch's
    own cpuinfo probes)."""
    model, flags, signature = _proc_cpuinfo()
    probes = {"avx512_bf16": getattr(torch.cpu, "_is_avx512_bf16_supported", None),
              "amx_tile": getattr(torch.cpu, "_is_amx_tile_supported", None)}
    for flag, probe in probes.items():
        try:
            if probe is not None and probe():
                flags.add(flag)
        except Exception:  # a private helper; its absence only loses a probe
            pass
    native = any(f in flags for f in BF16_FLAGS)
    return CpuInfo(model or platform.processor() or "unknown", tuple(f for f in _REPORTED_FLAGS if f in flags), native,
                   signature)


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What a timing needs beside it: the CPU (always, it runs the data path) and the GPU if any."""
    out = cpu_info().as_dict() | {"torch_threads": torch.get_num_threads()}
    device = torch.device(device)
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def describe_cpu(machine: dict) -> str:
    """A recorded machine's CPU in a few words: its model name and, where recorded, the kind behind it
    (family / model / stepping) and the kernels torch picked ("AMD EPYC (family 23 model 1 stepping 2,
    AVX2)"). Two cells are bit-reproducible against each other only if these agree. Results written
    before the signature was recorded give the model name and capability alone."""
    detail = ", ".join(x for x in (machine.get("cpu_signature"), machine.get("torch_cpu_capability")) if x)
    return f"{machine.get('cpu_model') or 'unknown CPU'}" + (f" ({detail})" if detail else "")


def check_attn_implementation(name: str) -> str:
    if name not in ATTN_IMPLEMENTATIONS:
        raise EebenchError(f"unknown attention implementation {name!r}; known: {', '.join(ATTN_IMPLEMENTATIONS)}")
    return name


def choose_attn_implementation(requested: str, device: torch.device | str, precision: str = "fp32") -> str:
    """The attention kernel a backbone is built with.

    ``eager`` or ``sdpa`` is used as given. ``auto``: SDPA on CUDA (fused flash / memory-efficient
    kernels); on the CPU eager attention, the faster of the two for training at these model
    sizes in ``benchmarks/test_trainer_speed_bench.py`` (padded batches need a mask, which keeps
    SDPA on its generic CPU path; see the README's performance section for the figures).
    """
    check_attn_implementation(requested)
    if requested != "auto":
        return requested
    return "sdpa" if torch.device(device).type == "cuda" else "eager"


def resolve_precision(requested: str, device: torch.device | str, what: str = "training") -> tuple[str, str | None]:
    """(precision that will run, a one-line note when it differs from the request, else None).

    bf16 on the CPU runs only where the CPU has native bf16 (avx512_bf16 or AMX); elsewhere
    autocast would emulate it and be slower than fp32, so fp32 runs and the note says so.
    fp16 on the CPU is refused (no CPU has fast fp16 training here).
    """
    if requested not in PRECISIONS:
        raise EebenchError(f"unknown precision {requested!r}; known: {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if requested == "fp32" or device.type == "cuda":
        return requested, None
    if requested == "fp16":
        raise EebenchError("precision fp16 needs a CUDA device; on the CPU use --precision bf16 "
                           "(where the CPU has native bf16) or fp32")
    info = cpu_info()
    if info.native_bf16:
        return "bf16", None
    return "fp32", (f"--precision bf16 would be slow on this CPU ({info.model}: no avx512_bf16 / amx_bf16, "
                    f"bf16 would be emulated); running {what} in fp32")


def autocast(device: torch.device | str, precision: str) -> AbstractContextManager:
    """Autocast for an already resolved precision (``resolve_precision``); fp32: no-op."""
    device = torch.device(device)
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
