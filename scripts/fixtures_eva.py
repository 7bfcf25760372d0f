#!/usr/bin/env python3
"""Reference fixture for EVA (``init_lora_weights="eva"``): PEFT's ``initialize_lora_eva_weights``
on a tiny Llama from ``fixtures/llama`` with a fixed list of batches.

Writes ``fixtures/eva/<case>/``:

  meta.json              base case, lora_config (incl. eva_config), the ranks PEFT chose per
                         layer, the resulting rank_pattern / alpha_pattern / target_modules,
                         the number of forward passes EVA ran
  batches.safetensors    input_ids / attention_mask / labels, [n_batches, batch, seq] (int64)
  expected.safetensors   lora_A.<path> [rank, in] for every layer that kept an adapter
  adapter/               PEFT's save_pretrained of the EVA adapter

The batches draw tokens from a Zipf law over a small vocabulary so the layer inputs have a clear
principal subspace (random uniform tokens give a flat spectrum that never converges).

``python scripts/fixtures_eva.py`` (CPU, float32, a few seconds).
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402
import peft  # noqa: E402
from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "eva_all_linear": dict(base="untied_mha", r=4, alpha=8, eva=dict(rho=2.0, tau=0.99), whiten=False),
    "eva_whiten_qv": dict(base="tied_gqa_llama3", r=4, alpha=8, eva=dict(rho=2.0, tau=0.95), whiten=True,
                          targets=["q_proj", "v_proj"]),
}
N_BATCHES, BATCH, SEQ = 24, 4, 16


def make_batches(seed, vocab):
    g = torch.Generator().manual_seed(seed)
    words = torch.randperm(vocab - 3, generator=g)[:24] + 3
    p = 1.0 / torch.arange(1, len(words) + 1, dtype=torch.float64)
    out = dict(input_ids=[], attention_mask=[], labels=[])
    for _ in range(N_BATCHES):
        idx = torch.multinomial(p.expand(BATCH, -1), SEQ, replacement=True, generator=g)
        ids = words[idx]
        ids[:, 0] = 1
        mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
        mask[1, -5:] = 0
        ids[mask == 0] = 0
        labels = ids.clone()
        labels[mask == 0] = -100
        labels[:, :3] = -100  # a "prompt": masked by use_label_mask
        out["input_ids"].append(ids)
        out["attention_mask"].append(mask)
        out["labels"].append(labels)
    return {k: torch.stack(v) for k, v in out.items()}


def build(name, spec, root):
    mf.setup_determinism()
    out = root / "eva" / name
    out.mkdir(parents=True, exist_ok=True)
    model = mf.load_base(root / "llama" / spec["base"])
    data = make_batches(5, model.config.vocab_size)
    batches = [{k: data[k][i] for k in data} for i in range(N_BATCHES)]
    eva = EvaConfig(whiten=spec["whiten"], **spec["eva"])
    cfg = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=spec.get("targets", ALL),
                     init_lora_weights="eva", eva_config=eva)
    torch.manual_seed(0)
    pm = get_peft_model(model, cfg)
    calls = []

    def forward_fn(m, inputs):
        calls.append(1)
        return m(**inputs)

    initialize_lora_eva_weights(pm, dataloader=batches, forward_fn=forward_fn, show_progress_bar=False)
    final = pm.peft_config["default"]
    ranks, tensors = {}, {}
    prefix = "base_model.model."
    for mname, m in pm.named_modules():
        if mname.startswith(prefix) and hasattr(m, "lora_A") and "default" in m.lora_A:
            path = mname[len(prefix):]
            ranks[path] = int(m.r["default"])
            tensors[f"lora_A.{path}"] = m.lora_A["default"].weight.detach().clone()
    for mname, m in model.named_modules():
        pass
    pm.save_pretrained(str(out / "adapter"))
    (out / "adapter" / "README.md").unlink(missing_ok=True)
    mf.save_st(data, out / "batches.safetensors")
    mf.save_st(tensors, out / "expected.safetensors")
    lora_config = dict(r=spec["r"], lora_alpha=spec["alpha"], target_modules=spec.get("targets", ALL),
                       init_lora_weights="eva", eva_config=dict(whiten=spec["whiten"], **spec["eva"]))
    meta = dict(
        base=spec["base"],
        lora_config=lora_config,
        ranks=ranks,
        rank_pattern=dict(final.rank_pattern),
        alpha_pattern=dict(final.alpha_pattern),
        target_modules=sorted(final.target_modules) if not isinstance(final.target_modules, str) else final.target_modules,
        forward_calls=len(calls),
        versions=dict(torch=torch.__version__, peft=peft.__version__),
        command="python scripts/fixtures_eva.py",
    )
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    mf.log(f"{name}: {len(calls)} forwards, ranks {ranks}")


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "fixtures")
    for name, spec in CASES.items():
        build(name, spec, root)


if __name__ == "__main__":
    main()
