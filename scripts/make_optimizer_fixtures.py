"""Reference optimizer steps for the adapter optimizers (AdamW, LoRA+, LoRA-FA).

Loads fixtures/llama/tied_gqa_llama3 with the PEFT adapter fixtures/peft/lora_qv/adapter (made by
make_fixtures.py), takes two optimizer steps on the fixture batch with each optimizer, and writes
the adapter tensors after the steps to fixtures/optim/<kind>.safetensors under PEFT's saved keys.

    python scripts/make_optimizer_fixtures.py --fixtures fixtures

CPU, float32. LoRA-FA's bf16 autocast of the projection is switched off so the reference is f32.
"""
import argparse, json, os

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM
from peft import PeftModel, get_peft_model_state_dict
from peft.optimizers import create_loraplus_optimizer, create_lorafa_optimizer
import peft.optimizers.lorafa as lorafa

LR, WD = 1e-3, 0.01


def run(fx, kind):
    base = LlamaForCausalLM.from_pretrained(os.path.join(fx, "llama", "tied_gqa_llama3"), torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(fx, "peft", "lora_qv", "adapter"), is_trainable=True)
    model.train()  # lora_dropout is 0 in this adapter: train mode is deterministic
    exp = load_file(os.path.join(fx, "peft", "lora_qv", "expected.safetensors"))
    if kind == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    elif kind == "loraplus":
        opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=16.0, loraplus_weight_decay=WD)
    else:
        lorafa.is_bf16_available = lambda *a, **k: False
        opt = create_lorafa_optimizer(model, r=8, lora_alpha=16, lr=LR, weight_decay=WD)
    losses = []
    for _ in range(2):
        out = model(input_ids=exp["input_ids"], attention_mask=exp["attention_mask"], labels=exp["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
    sd = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    sd["losses"] = torch.tensor(losses, dtype=torch.float32)
    return sd


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fixtures", default="fixtures")
    args = ap.parse_args()
    out = os.path.join(args.fixtures, "optim")
    os.makedirs(out, exist_ok=True)
    for kind in ("adamw", "loraplus", "lorafa"):
        sd = run(args.fixtures, kind)
        save_file(sd, os.path.join(out, f"{kind}.safetensors"), metadata={"format": "pt"})
        print(kind, "losses", sd["losses"].tolist())
    with open(os.path.join(out, "settings.json"), "w") as f:
        json.dump({"lr": LR, "weight_decay": WD, "loraplus_lr_ratio": 16.0, "loraplus_weight_decay": WD, "steps": 2,
                   "adamw": "torch defaults (betas 0.9/0.999, eps 1e-8)",
                   "lorafa": "PEFT LoraFAOptimizer defaults (eps 1e-6), bf16 autocast off"}, f, indent=2)


if __name__ == "__main__":
    main()
