"""Post-training quantization of an exported Hugging Face Llama folder (model/export_hf.py) with torchao, through
transformers' `TorchAoConfig`: the output is a folder that `AutoModelForCausalLM.from_pretrained` loads with no
extra argument, with the input's tokenizer, chat template and generation config.

    python -m model.quantize runs/<run>/hf/step-000300 runs/<run>/quantized/step-000300-int8 --scheme int8

The linear layers of the decoder are quantized (weight-only); the embedding and the output head stay as they
were, as torchao and transformers leave them by default. Before anything is written, the quantized model runs two
check rows; the written folder is loaded back and must give the same logits, bit for bit. `quantize_info.json`
records the scheme, what the files store, the input's checksum, the sizes on disk, and how far the quantized
logits moved from the original's on the check rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from model.tokenizer import TOKENIZER_FILES

INFO_NAME = "quantize_info.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class QuantizeError(ValueError):
    """A quantization that cannot be done as asked: refused before any work."""


@dataclass(frozen=True)
class Scheme:
    """Weight-only symmetric integer quantization of each linear layer's weight: `bits` per value, one scale per
    output channel (`group_size` None) or per group of `group_size` consecutive input weights of a row."""
    bits: int
    group_size: int | None
    packed: bool = False  # int4 two to a byte, in the tile layout of the CUDA kernel (tinygemm): CUDA only
    calibrated: bool = False  # GPTQ on calibration rows instead of round-to-nearest (the same storage)
    stores: str = ""

    def torchao_config(self):
        from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerAxis, PerGroup

        if self.packed:
            return Int4WeightOnlyConfig(group_size=self.group_size, int4_packing_format="tile_packed_to_4d")
        return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{self.bits}"),
                                    granularity=PerGroup(self.group_size) if self.group_size else PerAxis(0))


_UNPACKED_INT4 = ("int4 values (-8..7) kept one per byte in int8 storage (torchao's IntxUnpackedToInt8Tensor, the "
                  "CPU format), so on disk it is no smaller than int8; plus one scale per {g} weights")
SCHEMES: dict[str, Scheme] = {
    "int8": Scheme(8, None, stores="int8 values, one byte per weight, and one scale per output channel"),
    **{f"int4-g{g}": Scheme(4, g, stores=_UNPACKED_INT4.format(g=g)) for g in (32, 64, 128)},
    # torchao's GPTQ and AWQ int4 run on CUDA only (GPTQ asserts it; both need the mslk int4 kernels), so GPTQ is
    # here (gptq below), writing its values and scales into torchao's CPU int4 format.
    **{f"int4-g{g}-gptq": Scheme(4, g, calibrated=True, stores=_UNPACKED_INT4.format(g=g) + "; values and scales "
                                 "chosen by GPTQ on validation rows (quantize_info.json names them)")
       for g in (32, 64, 128)},
    "int4-g128-cuda": Scheme(4, 128, packed=True,
                             stores="int4 values packed two to a byte in tinygemm's tile layout, plus one scale and "
                                    "zero point per 128 weights; loads and runs on CUDA only"),
}


def scheme_named(name: str, setting: str = "--scheme") -> Scheme:
    """The scheme, if it exists and this machine can run it; `setting` is what the user set (named in errors)."""
    if name not in SCHEMES:
        raise QuantizeError(f"{setting}: unknown quantization scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    if SCHEMES[name].packed and not torch.cuda.is_available():
        raise QuantizeError(f"{setting}: {name} is a packed format that needs a CUDA device, and none is visible; "
                            f"on CPU choose one of {', '.join(n for n, s in SCHEMES.items() if not s.packed)}")
    return SCHEMES[name]


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)


def model_checksum(folder: Path) -> str:
    """sha256 over the config and the weight files: what the quantized model was made from."""
    digest = hashlib.sha256()
    for path in [folder / "config.json", *weight_files(folder)]:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def linear_inputs(config: dict) -> dict[str, int]:
    """Each quantized linear layer of a Llama decoder layer, by its name, with its input size: groups run along it."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return {**{f"self_attn.{p}_proj": config["hidden_size"] for p in "qkv"}, "self_attn.o_proj": heads * head_dim,
            "mlp.gate_proj": config["hidden_size"], "mlp.up_proj": config["hidden_size"],
            "mlp.down_proj": config["intermediate_size"]}


def check_input(hf_dir: Path, scheme_name: str) -> None:
    """A folder that is not a model with its tokenizer, or whose layers the scheme's groups do not tile, refused
    before any work."""
    if not (hf_dir / "config.json").is_file():
        raise QuantizeError(f"{hf_dir}: not a Hugging Face model folder (no config.json)")
    if not weight_files(hf_dir):
        raise QuantizeError(f"{hf_dir}: no weight files (*.safetensors)")
    if not any((hf_dir / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        raise QuantizeError(f"{hf_dir}: no tokenizer (tokenizer.model or tokenizer.json); the quantized folder "
                            f"would not be usable: export the checkpoint with its tokenizer first")
    if (hf_dir / INFO_NAME).is_file():
        raise QuantizeError(f"{hf_dir}: already quantized ({json.loads((hf_dir / INFO_NAME).read_text())['scheme']})")
    group = SCHEMES[scheme_name].group_size
    for layer, size in linear_inputs(json.loads((hf_dir / "config.json").read_text())).items():
        if group and size % group:
            raise QuantizeError(f"{scheme_name}: groups of {group} weights do not tile {layer} (input size {size}) of "
                                f"{hf_dir}; choose a scheme whose group size divides every layer's input, or int8")


def calibration_manifest(hf_dir: Path, manifest: Path | None, rows: int, held_out: int) -> tuple[Path, int]:
    """The shard manifest whose validation rows calibrate a GPTQ scheme (the one given, else the one the export
    records) and its validation rows; refused before any work when there is none or it holds fewer rows than asked
    beside the `held_out` rows the evaluation's perplexity reads."""
    from tasks.lib.manifest import ShardManifest

    if manifest is None:
        info = hf_dir / "export_info.json"
        recorded = json.loads(info.read_text()).get("manifest") if info.is_file() else None
        if recorded is None:
            raise QuantizeError(f"{hf_dir}: a calibrated scheme needs validation rows and this folder records no "
                                f"shard manifest; give --manifest (a manifest of text in this model's tokenizer)")
        manifest = Path(recorded)
    if not (Path(manifest) / "manifest.json").is_file():
        raise QuantizeError(f"--manifest {manifest}: no manifest.json there")
    total = sum(s.rows for s in ShardManifest.load(manifest).split("valid"))
    free = total - min(held_out, total)
    if rows < 1 or rows > free:
        raise QuantizeError(f"--calibration-rows {rows}: the validation shards of {manifest} hold {total} rows, "
                            f"{free} of them beside the {held_out} held out for perplexity (--held-out-rows); "
                            f"ask for 1 to {free}")
    return Path(manifest), total


@torch.no_grad()
def input_hessians(model, tokens: torch.Tensor, batch: int = 8) -> dict[str, torch.Tensor]:
    """For each quantized linear layer of the float model: 2/n X^T X over its inputs on the calibration tokens."""
    hessians, counts, hooks = {}, {}, []
    layers = tuple(linear_inputs(model.config.to_dict()))
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(layers):
            def accumulate(module, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                hessians[name] = hessians.get(name, 0) + x.T @ x
                counts[name] = counts.get(name, 0) + x.shape[0]
            hooks.append(module.register_forward_pre_hook(accumulate))
    for i in range(0, len(tokens), batch):
        model(tokens[i:i + batch])
    for hook in hooks:
        hook.remove()
    return {name: 2 * h / counts[name] for name, h in hessians.items()}


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, damping: float = 0.01,
         block: int = 128, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al. 2022, Algorithm 1, with groups): quantize `weight` [out, in] column by column,
    each column's rounding error spread over the columns not yet quantized through the inverse Hessian of the
    layer's inputs, so the layer's outputs on those inputs move least. Symmetric, one scale per `group` columns of
    a row, taken from the weights as they stand when the group begins, and rounded to `scale_dtype` (what the
    stored format keeps). Returns (integer values as int8, scales)."""
    qmax, qmin = 2 ** (bits - 1) - 1, -2 ** (bits - 1)
    w = weight.detach().float().clone()
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damping * torch.mean(torch.diag(h)) * torch.eye(len(h))
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    columns, block = w.shape[1], max(block, group) // group * group  # a group never spans two blocks
    q = torch.zeros_like(w, dtype=torch.int8)
    scales = torch.zeros(w.shape[0], columns // group)
    for start in range(0, columns, block):
        end = min(start + block, columns)
        part, errors, h_part = w[:, start:end].clone(), torch.zeros(w.shape[0], end - start), h_inv[start:end, start:end]
        for j in range(end - start):
            column = start + j
            if column % group == 0:
                scale = part[:, j:j + group].abs().amax(dim=1) / ((qmax - qmin) / 2)
                scale = scale.clamp(min=torch.finfo(torch.float32).smallest_normal)
                scales[:, column // group] = scale.to(scale_dtype).float()
            scale = scales[:, column // group]
            values = torch.clamp(torch.round(part[:, j] * (1.0 / scale)), qmin, qmax)
            q[:, column] = values.to(torch.int8)
            error = (part[:, j] - values * scale) / h_part[j, j]
            part[:, j:] -= error.unsqueeze(1) @ h_part[j, j:].unsqueeze(0)
            errors[:, j] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return q, scales


def check_tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in weight_files(folder))


@torch.no_grad()
def quantize(hf_dir: Path, out: Path, scheme_name: str, calibration_rows: int = 128,
             manifest: Path | None = None, held_out_rows: int = 64) -> dict:
    """`held_out_rows`: the evaluation's perplexity rows (EvalSpec.perplexity_rows), which GPTQ never
    calibrates on."""
    logging.getLogger("torchao").setLevel(logging.ERROR)  # its CUDA-only kernels fail to load on CPU, harmlessly
    from transformers import AutoModelForCausalLM, TorchAoConfig

    from model.data import validation_picks, validation_rows

    hf_dir, out = Path(hf_dir).resolve(), Path(out)
    scheme = scheme_named(scheme_name)
    check_input(hf_dir, scheme_name)
    if scheme.calibrated:
        manifest, total = calibration_manifest(hf_dir, Path(manifest) if manifest else None, calibration_rows,
                                               held_out_rows)
    device = "cuda" if scheme.packed else "cpu"

    original = AutoModelForCausalLM.from_pretrained(hf_dir, device_map=device).eval()
    tokens = check_tokens(original.config.vocab_size).to(device)
    original_logits = original(tokens).logits.float()
    solved = {}
    if scheme.calibrated:
        rows = validation_rows(manifest, calibration_rows, avoid=held_out_rows)["tokens"]
        hessians = input_hessians(original, rows)
        dtype = original.dtype  # torchao keeps scales in the weights' dtype
        solved = {name: gptq(original.get_submodule(name).weight, h, scheme.bits, scheme.group_size,
                             scale_dtype=dtype) for name, h in hessians.items()}
        del hessians
    del original
    model = AutoModelForCausalLM.from_pretrained(hf_dir, device_map=device,
                                                 quantization_config=TorchAoConfig(scheme.torchao_config())).eval()
    for name, (values, scales) in solved.items():  # GPTQ's values and scales in the round-to-nearest format
        weight = model.get_submodule(name).weight
        weight.qdata.copy_(values)
        weight.scale.copy_(scales.to(weight.scale.dtype).view_as(weight.scale))
    logits = model(tokens).logits.float()
    quantized = sorted(name for name, module in model.named_modules()
                       if isinstance(module, torch.nn.Linear) and type(module.weight).__name__ != "Parameter")

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    del model
    for name in (*TOKENIZER_FILES, "generation_config.json"):  # the input's own, byte for byte
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, tmp / name)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, device_map=device).eval()
    reload_diff = (reloaded(tokens).logits.float() - logits).abs().max().item()
    if reload_diff != 0:
        raise RuntimeError(f"quantize: the written folder gives other logits than the quantized model in memory "
                           f"(max |difference| {reload_diff:.3g}); nothing was written to {out}")
    info = {"scheme": scheme_name, "bits": scheme.bits, "group_size": scheme.group_size, "stores": scheme.stores,
            "source": str(hf_dir), "source_sha256": model_checksum(hf_dir), "quantized_layers": len(quantized),
            "bytes": folder_bytes(tmp), "source_bytes": folder_bytes(hf_dir),
            "max_logit_change": (logits - original_logits).abs().max().item(), "reload_logit_diff": reload_diff}
    if scheme.calibrated:  # which rows: model/data.validation_rows's evenly spaced picks of the validation split
        info["calibration"] = {"manifest": str(Path(manifest).resolve()), "validation_rows": total,
                               "rows": validation_picks(total, calibration_rows, avoid=held_out_rows).tolist(),
                               "held_out_rows": held_out_rows, "method": "gptq"}
    (tmp / INFO_NAME).write_text(json.dumps(info, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return info


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", type=Path, help="an exported Hugging Face folder (python -m model.export_hf)")
    p.add_argument("out", type=Path)
    p.add_argument("--scheme", required=True, help="; ".join(f"{n}: {s.stores}" for n, s in SCHEMES.items()))
    p.add_argument("--calibration-rows", type=int, default=128, help="GPTQ schemes: validation rows to calibrate on")
    p.add_argument("--held-out-rows", type=int, default=64,
                   help="GPTQ schemes: the evaluation's perplexity rows, never calibrated on (EvalSpec.perplexity_rows)")
    p.add_argument("--manifest", type=Path, default=None,
                   help="GPTQ schemes: the shard manifest to calibrate on (default: the one the export records)")
    args = p.parse_args(argv)
    try:
        info = quantize(args.hf_dir, args.out, args.scheme, args.calibration_rows, args.manifest, args.held_out_rows)
    except QuantizeError as err:
        raise SystemExit(f"error: {err}")
    print(f"{args.scheme}: {info['quantized_layers']} linear layers quantized; weights {info['bytes'] / 1e6:.1f} MB "
          f"on disk against {info['source_bytes'] / 1e6:.1f} MB ({info['bytes'] / info['source_bytes']:.2f} x); "
          f"max |logit change| {info['max_logit_change']:.3g}; reloaded logits identical")
    print(f"stores: {info['stores']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
