#!/usr/bin/env python3
"""Reference fixtures for the weight-mutating initialisations: PiSSA (full SVD and
``pissa_niter_N``) and OLoRA, plus PEFT's ``path_initial_model_for_weight_conversion``.

For each case under ``fixtures/init/<case>/`` (base model: a tiny Llama from ``fixtures/llama``):

  meta.json               base case, lora_config, adapted modules (r, scaling), checks made here
  expected.safetensors    input_ids / attention_mask / labels, logits of the base, of the model
                          right after init (== base), and of the "trained" model;
                          residual.<path>   the frozen weight after init, [out, in]
                          delta.<path>      scaling * B0 @ A0 right after init, [out, in]
  trained/                the "trained" adapter (A, B perturbed after init), PEFT's save_pretrained
  converted/              the same, saved with path_initial_model_for_weight_conversion (a plain
                          LoRA of rank 2r that applies to the original base)

``--check-rust DIR`` instead loads every ``DIR/<case>/`` adapter written by the Rust tests
(``RUST_ADAPTER_EXPORT=DIR cargo test --test parity init_``) onto the original base with Python
PEFT and compares its logits with the fixture's trained logits.

Runs on CPU in float32 with fixed seeds: ``python scripts/fixtures_init.py`` (a few seconds).
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402
import peft  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
CASES = {
    # name: (base, lora config kwargs)
    "pissa": ("untied_mha", dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa")),
    "olora_rslora": (
        "tied_gqa_llama3",
        dict(r=4, lora_alpha=16, use_rslora=True, target_modules=TARGETS, init_lora_weights="olora"),
    ),
    "pissa_niter": ("untied_mha", dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa_niter_4")),
}
PREFIX = "base_model.model."


def weights_of(peft_model):
    out = {}
    for name, m in peft_model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            path = name[len(PREFIX):]
            a = m.lora_A["default"].weight.detach()
            b = m.lora_B["default"].weight.detach()
            out[path] = dict(
                residual=m.get_base_layer().weight.detach().clone(),
                delta=(m.scaling["default"] * b @ a).clone(),
                r=int(m.r["default"]),
                scaling=float(m.scaling["default"]),
            )
    return out


def logits_of(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.detach().clone()


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def build(name, base_case, kwargs, root):
    mf.setup_determinism()
    base_dir = root / "llama" / base_case
    out = root / "init" / name
    out.mkdir(parents=True, exist_ok=True)
    model = mf.load_base(base_dir)
    ids, mask, labels = mf.make_train_inputs(11, model.config.vocab_size)
    logits_base = logits_of(model, ids, mask)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}

    torch.manual_seed(123)
    cfg = LoraConfig(**kwargs)
    pm = get_peft_model(model, cfg)
    pm.eval()
    init = weights_of(pm)
    logits_init = logits_of(pm, ids, mask)

    tensors = dict(input_ids=ids, attention_mask=mask, labels=labels,
                   logits_base=logits_base, logits_init=logits_init)
    checks = dict(init_vs_base=rel(logits_init, logits_base))
    for path, w in init.items():
        tensors[f"residual.{path}"] = w["residual"]
        tensors[f"delta.{path}"] = w["delta"]
        if kwargs["init_lora_weights"].startswith("pissa_niter"):
            W = originals[f"{path}.weight"]
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            r = w["r"]
            exact = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
            checks[f"niter_err.{path}"] = (torch.linalg.norm(W - w["delta"]) / torch.linalg.norm(W)).item()
            checks[f"exact_err.{path}"] = (torch.linalg.norm(W - exact) / torch.linalg.norm(W)).item()

    with tempfile.TemporaryDirectory() as tmp:
        init_dir = Path(tmp) / "initial"
        pm.save_pretrained(str(init_dir))
        # "Training": a seeded perturbation of every A and B.
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
        tensors["logits_trained"] = logits_of(pm, ids, mask)
        pm.save_pretrained(str(out / "trained"))
        pm.save_pretrained(str(out / "converted"), path_initial_model_for_weight_conversion=str(init_dir))

    for form in ["trained", "converted"]:
        (out / form / "README.md").unlink(missing_ok=True)

    # What Python itself gets back from the two saved forms, on the original base.
    for form in ["trained", "converted"]:
        fresh = mf.load_base(base_dir)
        torch.manual_seed(999)
        loaded = PeftModel.from_pretrained(fresh, str(out / form))
        checks[f"reload_{form}_vs_trained"] = rel(logits_of(loaded, ids, mask), tensors["logits_trained"])

    mf.save_st(tensors, out / "expected.safetensors")
    meta = dict(
        base=base_case,
        lora_config=kwargs,
        modules={p: dict(r=w["r"], scaling=w["scaling"]) for p, w in init.items()},
        checks=checks,
        versions=dict(torch=torch.__version__, peft=peft.__version__),
        command="python scripts/fixtures_init.py",
    )
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    mf.log(f"{name}: {json.dumps(checks)}")


def check_rust(rust_root, root):
    worst = 0.0
    report = {}
    for name, (base_case, _) in CASES.items():
        d = Path(rust_root) / name
        if not d.exists():
            continue
        exp = load_file(str(root / "init" / name / "expected.safetensors"))
        model = mf.load_base(root / "llama" / base_case)
        loaded = PeftModel.from_pretrained(model, str(d))
        e = rel(logits_of(loaded, exp["input_ids"], exp["attention_mask"]), exp["logits_trained"])
        report[name] = e
        worst = max(worst, e)
    print(json.dumps(report, indent=2))
    if not report:
        sys.exit(2)
    sys.exit(0 if worst <= 1e-4 else 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fixtures")
    ap.add_argument("--check-rust", default=None)
    args = ap.parse_args()
    root = Path(args.out)
    if args.check_rust:
        check_rust(args.check_rust, root)
        return
    for name, (base_case, kwargs) in CASES.items():
        build(name, base_case, kwargs, root)


if __name__ == "__main__":
    main()
