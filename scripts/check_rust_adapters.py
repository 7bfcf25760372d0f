#!/usr/bin/env python3
"""Check adapters written by the Rust library against Python PEFT.

For every folder <rust-out>/<case>/ that holds adapter_config.json + adapter_model.safetensors
(the PEFT layout), with <case> one of the fixture cases of --suite (`peft`, the default, for
fixtures/peft/<case>; `structural` for fixtures/structural/<case>, layer replication and
trainable tokens), or a feature fixture fixtures/<case> with the same layout (e.g. `alora`);
`<case>_rust_made` is an adapter made by Rust for fixture <case>, compared with the logits
Rust wrote to rust_logits.safetensors:

  * load the base model fixtures/llama/<base from fixtures/<suite>/<case>/meta.json>,
  * load the Rust adapter with PeftModel.from_pretrained(..., is_trainable=False),
  * compare the adapter's tensor keys with the keys PEFT expects for that config
    (missing / unexpected), shapes, and values against fixtures/peft/<case>/adapter,
  * run the fixture inputs and compare logits with fixtures/peft/<case>/expected.safetensors.

Human-readable lines go to stderr; a JSON report goes to stdout. Exit status 1 if any case has
rel error > --tol (default 1e-4), missing or unexpected keys, a shape mismatch or a load error;
2 if no case was found.
"""

import argparse
import json
import logging
import sys
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from safetensors.torch import load_file

import peft
import transformers
from peft import PeftModel, get_peft_model_state_dict
from transformers import LlamaForCausalLM


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def load_base(model_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager")
    model = model.to(device="cpu", dtype=torch.float32)
    model.eval()
    return model


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def errs(a, b):
    a = a.detach().double()
    b = b.detach().double()
    max_abs = (a - b).abs().max().item()
    rel = max_abs / max(b.abs().max().item(), 1e-30)
    return max_abs, rel


def check_case(case, rust_dir, fixtures, tol, suite="peft"):
    res = dict(case=case, rust_dir=str(rust_dir), ok=False)
    fx_name = case[: -len("_rust_made")] if case.endswith("_rust_made") else case
    fx_case = fixtures / suite / fx_name
    if not fx_case.exists():
        fx_case = fixtures / fx_name
    meta_path = fx_case / "meta.json"
    if not meta_path.exists():
        res["error"] = f"no fixture for case {case!r} ({meta_path} missing)"
        return res
    meta = json.loads(meta_path.read_text())
    res["base"] = meta["base"]
    base_dir = fixtures / "llama" / meta["base"]
    expected = load_file(str(fx_case / "expected.safetensors"))
    rust_logits = rust_dir / "rust_logits.safetensors"
    if rust_logits.exists():
        expected["logits"] = load_file(str(rust_logits))["logits"]

    # adapter_config.json differences vs the fixture's (informative only)
    try:
        rust_cfg = json.loads((rust_dir / "adapter_config.json").read_text())
        fx_cfg = json.loads((fx_case / "adapter" / "adapter_config.json").read_text())
        important = ["r", "lora_alpha", "target_modules", "exclude_modules", "use_rslora", "use_dora",
                     "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "bias",
                     "lora_bias", "modules_to_save", "peft_type", "task_type", "fan_in_fan_out",
                     "layer_replication", "trainable_token_indices", "alora_invocation_tokens"]
        diffs = {}
        for k in important:
            a, b = rust_cfg.get(k), fx_cfg.get(k)
            if isinstance(a, list) and isinstance(b, list):
                a_cmp, b_cmp = sorted(map(str, a)), sorted(map(str, b))
            else:
                a_cmp, b_cmp = a, b
            if a_cmp != b_cmp:
                diffs[k] = dict(rust=a, fixture=b)
        res["config_diffs"] = diffs
        res["config_unknown_keys"] = sorted(set(rust_cfg) - set(fx_cfg))
    except Exception as e:  # noqa: BLE001
        res["error"] = f"reading adapter_config.json: {type(e).__name__}: {e}"
        return res

    # load with PEFT, capturing warnings (missing/unexpected keys are reported that way)
    handler = _ListHandler()
    root_logger = logging.getLogger()
    root_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            base = load_base(base_dir)
            model = PeftModel.from_pretrained(base, str(rust_dir), is_trainable=False)
    except Exception as e:  # noqa: BLE001
        res["error"] = f"PeftModel.from_pretrained failed: {type(e).__name__}: {e}"
        return res
    finally:
        root_logger.removeHandler(handler)
    model.eval()
    res["load_warnings"] = [str(w.message) for w in caught
                            if "key" in str(w.message).lower() or "adapter" in str(w.message).lower()]
    res["load_log_warnings"] = handler.records

    # key-level check: keys PEFT would save for this config vs keys in the Rust file
    file_sd = load_file(str(rust_dir / "adapter_model.safetensors"))
    want_sd = get_peft_model_state_dict(model)
    res["missing_keys"] = sorted(set(want_sd) - set(file_sd))
    res["unexpected_keys"] = sorted(set(file_sd) - set(want_sd))
    shape_mismatch = {}
    for k in sorted(set(want_sd) & set(file_sd)):
        if tuple(want_sd[k].shape) != tuple(file_sd[k].shape):
            shape_mismatch[k] = dict(rust=list(file_sd[k].shape), peft=list(want_sd[k].shape))
    res["shape_mismatch"] = shape_mismatch
    res["file_dtypes"] = sorted({str(v.dtype).replace("torch.", "") for v in file_sd.values()})

    # values vs the fixture adapter (only meaningful if Rust re-saved the fixture adapter)
    fx_file = fx_case / "adapter" / "adapter_model.safetensors"
    if fx_file.exists():
        fx_sd = load_file(str(fx_file))
        worst = 0.0
        for k in set(fx_sd) & set(file_sd):
            if fx_sd[k].shape == file_sd[k].shape:
                worst = max(worst, errs(file_sd[k].float(), fx_sd[k].float())[1])
        res["max_rel_vs_fixture_adapter"] = worst

    ids = expected["input_ids"]
    mask = expected["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    max_abs, rel = errs(logits, expected["logits"].float())
    valid = mask.bool()
    v_abs, v_rel = errs(logits[valid], expected["logits"].float()[valid])
    res.update(max_abs=max_abs, max_rel=rel, max_abs_valid=v_abs, max_rel_valid=v_rel)
    # Logits Rust computed are compared at real positions only (padded query positions are
    # implementation-defined); PEFT's own fixture logits everywhere.
    judged = v_rel if rust_logits.exists() else rel
    res["ok"] = (judged <= tol and not res["missing_keys"] and not res["unexpected_keys"]
                 and not shape_mismatch)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default="fixtures", help="fixtures folder (default: fixtures)")
    ap.add_argument("--rust-out", required=True, help="folder with one sub-folder per case")
    ap.add_argument("--tol", type=float, default=1e-4, help="max relative logits error (default 1e-4)")
    ap.add_argument("--suite", default="peft", choices=["peft", "structural"],
                    help="fixture folder the cases come from (default: peft)")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    fixtures = Path(args.fixtures)
    rust_out = Path(args.rust_out)
    case_dirs = sorted(d for d in rust_out.iterdir()
                       if d.is_dir() and (d / "adapter_config.json").exists()
                       and (d / "adapter_model.safetensors").exists()) if rust_out.is_dir() else []

    results = []
    for d in case_dirs:
        r = check_case(d.name, d, fixtures, args.tol, args.suite)
        results.append(r)
        if "error" in r:
            log(f"[FAIL] {d.name}: {r['error']}")
            continue
        status = "ok" if r["ok"] else "FAIL"
        log(f"[{status}] {d.name}: max_abs={r['max_abs']:.3e} max_rel={r['max_rel']:.3e} "
            f"(valid positions: {r['max_rel_valid']:.3e})")
        if r["missing_keys"]:
            log(f"    missing keys: {r['missing_keys']}")
        if r["unexpected_keys"]:
            log(f"    unexpected keys: {r['unexpected_keys']}")
        if r["shape_mismatch"]:
            log(f"    shape mismatch: {r['shape_mismatch']}")
        if r["config_diffs"]:
            log(f"    adapter_config differences vs fixture: {r['config_diffs']}")
        for w in r["load_warnings"] + r["load_log_warnings"]:
            log(f"    warning: {w}")

    report = dict(
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__),
        tol=args.tol,
        cases=results,
        all_ok=bool(results) and all(r.get("ok") for r in results),
    )
    print(json.dumps(report, indent=2, sort_keys=True))
    if not results:
        log(f"no case folders with adapter_config.json + adapter_model.safetensors under {rust_out}")
        sys.exit(2)
    sys.exit(0 if report["all_ok"] else 1)


if __name__ == "__main__":
    main()
