"""Blending saved LoRA adapters of one base model into one adapter, in the same PEFT layout.

Both methods aim at the weighted sum of the updates, per module: delta = sum_i w_i * s_i * B_i A_i
(s_i = alpha_i / r_i). The blend is written with lora_alpha = r, so its own scaling is 1 and the
weights and scalings live in the factors.

- linear: concatenate. A = [A_1; A_2; ...] (rows), B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] (columns).
  B @ A is then exactly the weighted sum; the rank is the sum of the ranks.
- svd: form the weighted sum and keep its best rank-k approximation (Eckart-Young), with the
  singular values split as sqrt between B and A so neither factor dwarfs the other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from lab.adapters import peft_format as pf
from lab.errors import ConfigError


def blend_adapters(directories: list[Path], weights: list[float], out: Path,
                   method: str = "linear", rank: Optional[int] = None) -> Path:
    """Write the weighted blend of N saved LoRA adapters to `out`.

    Args:
        directories: PEFT LoRA folders (same base model, same target modules, no DoRA).
        weights: one weight per adapter; negative weights subtract.
        out: the folder to write (created if needed).
        method: "linear" (exact, rank = sum of ranks) or "svd" (truncated to `rank`).
        rank: svd only: the blend's rank; default the largest input rank.

    Returns:
        `out`.

    Raises:
        ConfigError: for a weight count that differs from the adapter count, an unknown method,
            DoRA inputs, or adapters whose targets or shapes differ.
    """
    if not directories or len(weights) != len(directories):
        raise ConfigError(f"blend: {len(directories)} adapters but {len(weights)} weights; give one weight per adapter")
    if method not in ("linear", "svd"):
        raise ConfigError(f"blend: method={method!r} is unknown; use linear or svd")
    adapters = [_read(Path(d)) for d in directories]
    _check_compatible(adapters, directories)
    modules = adapters[0][1].keys()
    if method == "linear":
        factors = {m: _concat(adapters, weights, m) for m in modules}
    else:
        k = rank or max(int(cfg["r"]) for cfg, _ in adapters)
        if k < 1:
            raise ConfigError(f"blend: rank={rank} must be at least 1")
        factors = {m: _svd(_weighted_delta(adapters, weights, m), k) for m in modules}
    r = next(iter(factors.values()))[0].shape[0]
    first = adapters[0][0]
    config = pf.peft_config(first["target_modules"], r, float(r), float(first.get("lora_dropout", 0.0)),
                            False, first.get("base_model_name_or_path") or "")
    tensors = {}
    for m, (a, b) in factors.items():
        tensors[f"{pf.PREFIX}{m}.lora_A.weight"] = a
        tensors[f"{pf.PREFIX}{m}.lora_B.weight"] = b
    return pf.write_adapter(out, config, tensors)


def _read(directory: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """An adapter as (config, {module path: (A, B, scaling)}), in fp32."""
    config, tensors = pf.read_adapter(directory)
    if config.get("use_dora"):
        raise ConfigError(f"blend: {directory} is a DoRA adapter; its magnitude makes updates non-additive, so blend plain LoRA adapters only")
    scaling = float(config["lora_alpha"]) / int(config["r"])
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        path, suffix = pf.split_key(key)
        parts.setdefault(path, {})[suffix] = value.float()
    return config, {p: (t["lora_A.weight"], t["lora_B.weight"], scaling) for p, t in sorted(parts.items())}


def _check_compatible(adapters: list, directories: list[Path]) -> None:
    cfg0, mods0 = adapters[0]
    for (cfg, mods), d in zip(adapters[1:], directories[1:]):
        if sorted(cfg["target_modules"]) != sorted(cfg0["target_modules"]) or mods.keys() != mods0.keys():
            raise ConfigError(f"blend: {d} targets {sorted(cfg['target_modules'])} but {directories[0]} targets {sorted(cfg0['target_modules'])}; blend adapters trained on the same modules")
        for m, (a, b, _) in mods.items():
            a0, b0, _ = mods0[m]
            if (b.shape[0], a.shape[1]) != (b0.shape[0], a0.shape[1]):
                raise ConfigError(f"blend: {d} has {m} of shape {(b.shape[0], a.shape[1])} but {directories[0]} has {(b0.shape[0], a0.shape[1])}; blend adapters of the same base model")


def _concat(adapters: list, weights: list[float], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.cat([mods[module][0] for _, mods in adapters], dim=0)  # (sum r, in)
    b = torch.cat([w * mods[module][2] * mods[module][1] for w, (_, mods) in zip(weights, adapters)], dim=1)  # (out, sum r)
    return a, b


def _weighted_delta(adapters: list, weights: list[float], module: str) -> torch.Tensor:
    """sum_i w_i * s_i * B_i @ A_i, (out, in), in fp64 so the SVD sees no extra rounding."""
    total = None
    for w, (_, mods) in zip(weights, adapters):
        a, b, s = mods[module]
        d = (w * s) * (b.double() @ a.double())
        total = d if total is None else total + d
    return total


def _svd(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-k factors (A (k, in), B (out, k)) of delta's best rank-k approximation, zero-padded
    when k exceeds min(out, in) so every module of the blend has the same r."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    n = min(k, s.numel())
    root = s[:n].sqrt()
    a = torch.zeros(k, delta.shape[1], dtype=delta.dtype)
    b = torch.zeros(delta.shape[0], k, dtype=delta.dtype)
    a[:n] = root[:, None] * vh[:n]
    b[:, :n] = u[:, :n] * root
    return a.float(), b.float()


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m lab.adapters.blend OUT DIR:WEIGHT DIR:WEIGHT ... [--method svd --rank 8]`."""
    import argparse

    from lab.errors import LabError

    parser = argparse.ArgumentParser(description="Blend saved LoRA adapters (PEFT layout) into one.")
    parser.add_argument("out", type=Path, help="folder for the blended adapter")
    parser.add_argument("adapters", nargs="+", help="DIR:WEIGHT, e.g. outputs/checkpoints/<run>/export/adapter:0.5")
    parser.add_argument("--method", choices=["linear", "svd"], default="linear")
    parser.add_argument("--rank", type=int, default=None, help="svd: rank of the result (default: the largest input rank)")
    args = parser.parse_args(argv)
    try:
        pairs = [a.rsplit(":", 1) for a in args.adapters]
        dirs, weights = [Path(d) for d, _ in pairs], [float(w) for _, w in pairs]
    except ValueError:
        parser.error("give each adapter as DIR:WEIGHT, e.g. runs/a/adapter:0.5")
    try:
        out = blend_adapters(dirs, weights, args.out, method=args.method, rank=args.rank)
    except LabError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"blended {len(dirs)} adapters ({args.method}) into {out}")


if __name__ == "__main__":
    main()
