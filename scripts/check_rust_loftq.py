#!/usr/bin/env python3
"""Check a LoftQ adapter written by the Rust library against Python PEFT.

The parity test `loftq_on_tiny_llama_matches_peft_base_adapter_and_logits` exports, when
RUST_LOFTQ_EXPORT=<dir> is set:

  <dir>/adapter/            adapter_config.json + adapter_model.safetensors (init_lora_weights "loftq")
  <dir>/base/               the tiny Llama with its NF4 bases written dequantized (save_pretrained)
  <dir>/rust_logits.safetensors   Rust's logits on fixtures/loftq/llama/expected.safetensors' inputs

Two loads, each compared with Rust's logits:
  1. the Rust adapter on the ORIGINAL fixture base: PeftModel.from_pretrained re-runs LoftQ on each
     layer (PEFT's behaviour for an init_lora_weights="loftq" config), quantizing the base itself;
  2. the Rust adapter on the Rust-saved dequantized base (LoftQ again, idempotent on it).

PEFT's LoftQ needs bitsandbytes and CUDA; like scripts/fixtures_loftq.py this runs PEFT's own
loftq_init with the compute device set to "cpu" (PYTHONPATH=/tmp/bnb-site, see that script).

    RUST_LOFTQ_EXPORT=/tmp/rust-loftq cargo test --test parity loftq_on_tiny_llama
    PYTHONPATH=/tmp/bnb-site python scripts/check_rust_loftq.py /tmp/rust-loftq

Prints a JSON report; exit status 1 if a rel error exceeds --tol (default 1e-4).
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_loftq as fl  # noqa: E402  (patches PEFT's loftq_init for CPU)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from peft import PeftModel  # noqa: E402
import peft.tuners.lora.layer as lora_layer  # noqa: E402

import make_fixtures as mf  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export", type=Path)
    ap.add_argument("--fixtures", type=Path, default=Path(__file__).resolve().parent.parent / "fixtures")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    lora_layer.loftq_init = fl.LOFTQ
    real_find_spec = importlib.util.find_spec
    importlib.util.find_spec = lambda n, *a, **k: object() if n == "scipy" else real_find_spec(n, *a, **k)

    fx = args.fixtures / "loftq" / "llama"
    meta = json.loads((fx / "meta.json").read_text())
    exp = load_file(str(fx / "expected.safetensors"))
    ids, mask = exp["input_ids"], exp["attention_mask"]
    rust = load_file(str(args.export / "rust_logits.safetensors"))["logits"]
    keep = mask.unsqueeze(-1).float()
    report = {}
    for name, base_dir in [
        ("original_base", args.fixtures / "llama" / meta["base"]),
        ("rust_dequantized_base", args.export / "base"),
    ]:
        base = mf.load_base(base_dir)
        model = PeftModel.from_pretrained(base, str(args.export / "adapter"), is_trainable=False)
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        report[name] = dict(
            logits_rel_err_vs_rust=rel(logits * keep, rust * keep),
            logits_rel_err_vs_peft_fixture=rel(logits * keep, exp["logits"] * keep),
        )
    importlib.util.find_spec = real_find_spec
    ok = all(v["logits_rel_err_vs_rust"] <= args.tol for v in report.values())
    report["ok"] = ok
    print(json.dumps(report, indent=2))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
