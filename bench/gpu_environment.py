"""What the GPU validation records about its machine: the device, the driver, and versions that must agree.

Imports nothing heavy at module level: the runner reads this before any part starts.
"""

from __future__ import annotations

import subprocess
from typing import Any

GIB = 2**30
PACKAGES = (
    "torch",
    "lightning",
    "transformers",
    "peft",
    "bitsandbytes",
    "cupti-python",
    "nvidia-cuda-cupti",
    "cuda-bindings",
    "nvidia-ml-py",
    "flash-attn",
)


def _requirement_of(package: str, dependency: str) -> str | None:
    from importlib import metadata

    try:
        requires = metadata.requires(package) or []
    except metadata.PackageNotFoundError:
        return None
    for line in requires:
        name = line.split(";")[0].strip()
        if name.lower().replace("_", "-").startswith(dependency) and "extra ==" not in line:
            return name
    return None


def cupti_agreement(runtime: str | None, requirement: str | None, cupti_python: str | None) -> dict[str, Any]:
    """Whether the installed CUPTI runtime meets cupti-python's requirement, and what to carry if not.

    torch 2.11 pins ``nvidia-cuda-cupti==13.0.85.*`` (through ``cuda-toolkit[cupti]==13.0.2``);
    cupti-python 13.4.0 requires ``nvidia-cuda-cupti~=13.4``, 13.0.1 requires ``~=13.0``. Two
    libcupti versions in one process collide, so the cupti-python to carry is the one whose
    requirement the installed runtime meets.
    """
    if not runtime or not requirement:
        return {"agree": None, "note": "cupti-python or nvidia-cuda-cupti is not installed"}
    from packaging.requirements import Requirement

    if Requirement(requirement).specifier.contains(runtime, prereleases=True):
        return {"agree": True}
    major, minor = runtime.split(".")[:2]
    return {
        "agree": False,
        "advice": f"cupti-python {cupti_python} needs {requirement}, but this torch brought nvidia-cuda-cupti "
        f"{runtime}: carry the cupti-python {major}.{minor} release instead (cupti-python=={major}.{minor}.*)",
    }


def packaging_check() -> dict[str, Any]:
    """Versions that must agree: torch's CUDA, the CUPTI runtime it brought, and cupti-python's requirement."""
    from common import versions

    found = versions(PACKAGES)
    requirement = _requirement_of("cupti-python", "nvidia-cuda-cupti")
    out: dict[str, Any] = {"versions": found, "cupti_python_requires": requirement}
    out.update(cupti_agreement(found.get("nvidia-cuda-cupti"), requirement, found.get("cupti-python")))
    return out


def environment(dry_run: bool) -> dict[str, Any]:
    """The machine: device name, memory and capability, the driver (nvidia-smi), versions."""
    import torch

    env: dict[str, Any] = {"packaging": packaging_check(), "torch_cuda": torch.version.cuda}
    if dry_run or not torch.cuda.is_available():
        env["device"] = "cpu (dry run: each part's CPU path; nothing here is a GPU result)"
        return env
    props = torch.cuda.get_device_properties(0)
    env["device_name"] = props.name
    env["device"] = f"{props.name}, {props.total_memory / GIB:.0f} GiB, sm_{props.major}{props.minor}"
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        env["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        env["nvidia_smi"] = f"not available: {err}"
    return env


def device_line(env: dict[str, Any]) -> str:
    """One line naming the device, the driver and the versions that matter, for the summary."""
    found = env.get("packaging", {}).get("versions", {})
    line = f"Device: {env.get('device', 'unknown')}"
    smi = env.get("nvidia_smi", "")
    if smi and not smi.startswith("not available") and "," in smi:
        line += f" (driver {smi.split(',')[1].strip()})"
    versions = [f"torch {found.get('torch')} (CUDA {env.get('torch_cuda')})"]
    versions += [
        f"{name} {found[name]}"
        for name in ("bitsandbytes", "cupti-python", "transformers")
        if found.get(name)
    ]
    return line + "; " + ", ".join(versions)


def no_gpu_message() -> str | None:
    """None when a CUDA GPU is usable, else why not and what runs instead."""
    from gpu_tokens import no_gpu_message as needs_gpu

    return needs_gpu(
        "gpu_validate.py",
        "nothing was run. `--plan` lists the parts; `--dry-run` runs each part's CPU path.",
    )
