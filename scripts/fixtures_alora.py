#!/usr/bin/env python3
"""aLoRA (activated LoRA, PEFT's `alora_invocation_tokens`) reference fixtures, and a check of
adapters saved by the Rust library.

    python scripts/fixtures_alora.py [--out fixtures]          # writes fixtures/alora/
    python scripts/fixtures_alora.py --check-rust DIR          # DIR: adapter saved by Rust

Writes fixtures/alora/:

  meta.json               base fixture, config, invocation tokens, PEFT's offsets, adapted modules
  adapter/                adapter_config.json + adapter_model.safetensors (PEFT's save_pretrained)
  expected.safetensors    input_ids, attention_mask, labels [5, 14]; offsets [5] (-1 = None);
                          logits (PEFT aLoRA), base_logits (base model) [5, 14, 256]; loss [1];
                          grad.<saved key> for every lora_A / lora_B;
                          gen_input_ids, gen_attention_mask [2, 10] (left-padded prompts),
                          gen_tokens [2, 6] (PEFT generate, greedy), gen_logits [2, 6, 256] (raw
                          logits of each generated step)

The base is fixtures/llama/tied_gqa_llama3 (GQA, llama3 RoPE, tied head). The adapter targets
every projection (r 4, alpha 8), and after get_peft_model every lora_A / lora_B is set to
0.1 * N(0, 1) (seeded), so the adapter changes the logits. Rows of the forward batch:

  0  the invocation once, in the middle                          offset 8
  1  the invocation twice (the last counts) and a trailing
     partial "17 42" that must not match                          offset 5
  2  no invocation (a lone 17 and a partial "17 42")              None: the row runs as the base
  3  left-padded by 3, the invocation as the last 3 tokens        offset 3
  4  the invocation, then right padding of 3 (PEFT counts the
     padding in the offset, which changes nothing valid)          offset 9

PEFT semantics checked here (and asserted): offset = seq_len - start of the last full occurrence
(the first invocation token is adapted); positions before it equal the base model exactly.

--check-rust DIR loads DIR with PeftModel.from_pretrained on the same base, runs the same batch
and compares its logits with DIR/rust_logits.safetensors when present (an adapter made by
Rust, with the logits Rust computed), else with expected.safetensors (the fixture adapter
re-saved by Rust); prints a JSON report, exit 1 above --tol. The parity test writes both when
RUST_ADAPTER_EXPORT is set:

    RUST_ADAPTER_EXPORT=/tmp/rust-out cargo test --test parity alora
    python scripts/fixtures_alora.py --check-rust /tmp/rust-out/alora
    python scripts/fixtures_alora.py --check-rust /tmp/rust-out/alora_rust_made
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from safetensors.torch import load_file

import make_fixtures as mf
import peft
import transformers
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora.variants import calculate_alora_offsets

BASE = "tied_gqa_llama3"
SEED = 3001
INVOCATION = [17, 42, 99]
SEQ = 14
LORA = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    alora_invocation_tokens=INVOCATION,
    lora_dropout=0.0,
)
GEN_NEW = 6
# For generation: the prompt with the invocation ends with it (the usual aLoRA use).
GEN_PROMPTS = [
    [1, 120, 33, 64, 201, 7, 88] + INVOCATION,  # 10 tokens, adapter from position 7
    [1, 55, 140, 9, 230, 71],  # no invocation: the whole row, generated tokens too, is base
]


def rows(vocab):
    """The forward batch: ids, mask, labels and the offsets PEFT must find."""
    g = torch.Generator().manual_seed(SEED)
    avoid = set(INVOCATION)

    def rand(n):
        out = []
        while len(out) < n:
            t = int(torch.randint(3, vocab, (1,), generator=g))
            if t not in avoid:
                out.append(t)
        return out

    inv = INVOCATION
    r0 = [1] + rand(5) + inv + rand(SEQ - 9)
    r1 = [1, 5] + inv + rand(4) + inv + inv[:2]
    r2 = [1] + rand(3) + [17] + rand(3) + inv[:2] + rand(SEQ - 10)
    r3 = [mf.PAD_ID] * 3 + [1] + rand(SEQ - 7) + inv
    r4 = [1] + rand(4) + inv + rand(3) + [mf.PAD_ID] * 3
    ids = torch.tensor([r0, r1, r2, r3, r4], dtype=torch.int64)
    assert ids.shape == (5, SEQ), ids.shape
    mask = torch.ones_like(ids)
    mask[3, :3] = 0
    mask[4, -3:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :1] = -100
    # A token right after left padding is predicted from a padding position, whose logits are
    # implementation-defined (all keys masked): not a label.
    labels[:, 1:][mask[:, :-1] == 0] = -100
    want_offsets = [8, 5, None, 3, 9]
    return ids, mask, labels, want_offsets


def left_pad(prompts):
    n = max(len(p) for p in prompts)
    ids = torch.tensor([[mf.PAD_ID] * (n - len(p)) + p for p in prompts], dtype=torch.int64)
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts], dtype=torch.int64)
    return ids, mask


def build(root):
    case_dir = root / "alora"
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    base_dir = root / "llama" / BASE

    torch.manual_seed(SEED)
    base = mf.load_base(base_dir)
    vocab = base.config.vocab_size
    ids, mask, labels, want_offsets = rows(vocab)
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask).logits.float()
        base_gen = base.generate(
            *left_pad(GEN_PROMPTS)[:1], attention_mask=left_pad(GEN_PROMPTS)[1],
            max_new_tokens=GEN_NEW, do_sample=False, eos_token_id=None, pad_token_id=mf.PAD_ID,
            min_new_tokens=GEN_NEW,
        )

    cfg = LoraConfig(task_type="CAUSAL_LM", **LORA)
    model = get_peft_model(base, cfg)
    model.peft_config[mf.ADAPTER_NAME].base_model_name_or_path = str(base_dir.resolve())
    model.eval()
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert "lora_A" in name or "lora_B" in name, name
                p.copy_(0.1 * torch.randn(p.shape, generator=g))

    offsets = calculate_alora_offsets(model.peft_config, mf.ADAPTER_NAME, ids)
    assert offsets == want_offsets, (offsets, want_offsets)

    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    logits = out.logits.detach().float()

    # Positions before the invocation are the base model's, bit for bit; after it, they differ.
    for r, off in enumerate(offsets):
        start = SEQ - (off or 0)
        valid = mask[r].bool()
        before = torch.arange(SEQ) < start
        assert torch.equal(logits[r][before & valid], base_logits[r][before & valid]), r
        if off:
            assert (logits[r][~before & valid] - base_logits[r][~before & valid]).abs().max() > 1e-3, r

    adapter_dir = case_dir / "adapter"
    model.save_pretrained(str(adapter_dir))
    readme = adapter_dir / "README.md"
    if readme.exists():
        readme.unlink()
    cfg_path = adapter_dir / "adapter_config.json"
    saved = json.loads(cfg_path.read_text())
    saved["base_model_name_or_path"] = f"llama/{BASE}"
    if isinstance(saved.get("target_modules"), list):
        saved["target_modules"] = sorted(saved["target_modules"])
    assert saved["alora_invocation_tokens"] == INVOCATION
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True))

    saved_keys = set(get_peft_model_state_dict(model))
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            grads["grad." + mf.param_to_saved_key(name, saved_keys)] = p.grad.detach().float()

    # Generation: offsets from the prompt, reused for every cached step (T = 1: every new token of
    # a row that found the invocation gets the adapter).
    gen_ids, gen_mask = left_pad(GEN_PROMPTS)
    with torch.no_grad():
        gen = model.generate(
            input_ids=gen_ids, attention_mask=gen_mask, max_new_tokens=GEN_NEW, do_sample=False,
            eos_token_id=None, pad_token_id=mf.PAD_ID, min_new_tokens=GEN_NEW,
            output_logits=True, return_dict_in_generate=True,
        )
    gen_tokens = gen.sequences[:, gen_ids.shape[1]:]
    gen_logits = torch.stack(gen.logits, dim=1).float()
    # The row without the invocation generates exactly what the base generates.
    assert torch.equal(gen_tokens[1], base_gen[1, gen_ids.shape[1]:]), (gen_tokens, base_gen)
    assert not torch.equal(gen_tokens[0], base_gen[0, gen_ids.shape[1]:])

    # PEFT merge refuses aLoRA.
    try:
        model.merge_adapter()
        raise AssertionError("PEFT merged an aLoRA adapter")
    except NotImplementedError as e:
        merge_error = str(e)

    # The saved adapter reloads with the same logits.
    fresh = PeftModel.from_pretrained(mf.load_base(base_dir), str(adapter_dir), is_trainable=False)
    fresh.eval()
    with torch.no_grad():
        rl = fresh(input_ids=ids, attention_mask=mask).logits.float()
    assert mf.rel_err(rl, logits) < 1e-6

    exp = dict(
        input_ids=ids, attention_mask=mask, labels=labels,
        offsets=torch.tensor([-1 if o is None else o for o in offsets], dtype=torch.int64),
        logits=logits, base_logits=base_logits, loss=out.loss.detach().float().reshape(1),
        gen_input_ids=gen_ids, gen_attention_mask=gen_mask, gen_tokens=gen_tokens,
        gen_logits=gen_logits,
    )
    exp.update(grads)
    mf.save_st(exp, case_dir / "expected.safetensors")
    meta = dict(
        base=BASE, seed=SEED, lora_config=LORA, invocation=INVOCATION, offsets=offsets,
        gen_prompts=GEN_PROMPTS, gen_new_tokens=GEN_NEW, merge_error=merge_error,
        adapted_modules=mf.adapted_modules(model), saved_keys=sorted(saved_keys),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                      peft=peft.__version__),
    )
    (case_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    mf.log(f"[alora] offsets={offsets} loss={out.loss.item():.6f} gen={gen_tokens.tolist()} "
           f"({mf.dir_size(case_dir) / 1e3:.0f} kB)")


def check_rust(root, rust_dir, tol):
    exp = load_file(str(root / "alora" / "expected.safetensors"))
    base = mf.load_base(root / "llama" / BASE)
    model = PeftModel.from_pretrained(base, str(rust_dir), is_trainable=False)
    model.eval()
    ids, mask = exp["input_ids"], exp["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    valid = mask.bool()
    rust_logits = Path(rust_dir) / "rust_logits.safetensors"
    reference = load_file(str(rust_logits))["logits"] if rust_logits.exists() else exp["logits"]
    got, want = logits[valid].double(), reference[valid].double()
    max_abs = (got - want).abs().max().item()
    rel = max_abs / want.abs().max().item()
    cfg = json.loads((Path(rust_dir) / "adapter_config.json").read_text())
    offsets = calculate_alora_offsets(model.peft_config, mf.ADAPTER_NAME, ids)
    # PEFT must see the aLoRA config and act only after the invocation.
    with torch.no_grad():
        base_logits = mf.load_base(root / "llama" / BASE)(input_ids=ids, attention_mask=mask).logits
    changed = (logits - base_logits).abs().amax(-1)
    before_ok = True
    for r, o in enumerate(offsets):
        start = ids.shape[1] - (o or 0)
        sel = changed[r, :start][valid[r, :start]]
        before_ok &= sel.numel() == 0 or sel.max().item() == 0.0
    report = dict(
        rust_dir=str(rust_dir), compared_with=str(rust_logits if rust_logits.exists() else "expected"),
        max_abs=max_abs, max_rel=rel, tol=tol, offsets=offsets,
        alora_invocation_tokens=cfg.get("alora_invocation_tokens"),
        base_before_invocation=before_ok,
        ok=rel <= tol and before_ok and cfg.get("alora_invocation_tokens") is not None,
    )
    print(json.dumps(report, indent=2, sort_keys=True))
    return report["ok"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="fixtures", help="fixtures root (default: fixtures)")
    ap.add_argument("--check-rust", help="folder with an aLoRA adapter saved by Rust")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    mf.setup_determinism()
    root = Path(args.out)
    if args.check_rust:
        sys.exit(0 if check_rust(root, Path(args.check_rust), args.tol) else 1)
    build(root)


if __name__ == "__main__":
    main()
