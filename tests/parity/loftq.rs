//! NF4 and LoftQ against bitsandbytes 0.50.2 + PEFT 0.21.2 (`scripts/fixtures_loftq.py`):
//! NF4 codes and scales bit for bit, LoftQ's quantized base and `B @ A` per iteration, its error
//! falling with iterations below plain NF4's, and `get_peft_model(init_lora_weights="loftq")` on
//! the tiny Llama (every base, every adapter product, the logits).

use super::*;
use peft_lora::HostTensor;
use peft_lora::{loftq_factors, LoftQConfig};
use peft_lora::{LoraConfig, LoraLinear, Nf4Tensor, NF4_CODE};
use test_support::host;
use test_support::st::{f32s, i64s};

fn dir() -> PathBuf {
    fixtures().join("loftq")
}

/// Row-major `[m, k] x [k, n]`, accumulated in f64.
fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|t| a[i * k + t] as f64 * b[t * n + j] as f64)
                .sum();
            out[i * n + j] = s as f32;
        }
    }
    out
}

/// Burn `[in, out]` -> row-major PyTorch `[out, in]`.
fn pt(w: Tensor<B, 2>) -> Vec<f32> {
    w.transpose().into_data().to_vec::<f32>().unwrap()
}

#[test]
fn nf4_matches_bitsandbytes_bit_for_bit() {
    let st = SafetensorsFile::open(&dir().join("nf4.safetensors")).unwrap();
    assert_eq!(f32s(&st, "code").1, NF4_CODE.to_vec());
    for m in ["normal", "odd", "ties"] {
        let (shape, w) = f32s(&st, &format!("{m}.w"));
        let q = Nf4Tensor::quantize(&w, [shape[0], shape[1]]);
        let (_, packed) = i64s(&st, &format!("{m}.packed"));
        let packed: Vec<u8> = packed.iter().map(|v| *v as u8).collect();
        assert_eq!(
            q.packed, packed,
            "{m}: packed codes differ from bitsandbytes"
        );
        assert_eq!(q.absmax, f32s(&st, &format!("{m}.absmax")).1, "{m}: absmax");
        let (_, dq) = f32s(&st, &format!("{m}.dequant"));
        let err = host::max_abs_diff(&q.dequantize(), &dq);
        assert!(err <= 1e-6, "{m}: host dequant max err {err}");
        // The device path (a layer with an NF4 base) dequantizes to the same values.
        let layer = LoraLinear::<B>::from_nf4(&q, None, &Default::default());
        let err = host::max_abs_diff(&pt(layer.base_weight()), &dq);
        assert!(err <= 1e-6, "{m}: device dequant max err {err}");
        assert_eq!(layer.nf4.as_ref().unwrap().to_host(), q);
    }
}

#[test]
fn loftq_matches_peft_and_its_error_falls_below_nf4() {
    let st = SafetensorsFile::open(&dir().join("loftq.safetensors")).unwrap();
    for (case, r) in [("c64x48_r4", 4), ("c96x64_r8", 8)] {
        let (shape, w) = f32s(&st, &format!("{case}.w"));
        let (m, n) = (shape[0], shape[1]);
        let want_nf4 = f32s(&st, &format!("{case}.nf4_err")).1[0] as f64;
        let want_errs = f32s(&st, &format!("{case}.err_by_iter")).1;
        let nf4_err = host::fro_diff(&w, &Nf4Tensor::quantize(&w, [m, n]).dequantize());
        assert!(
            (nf4_err - want_nf4).abs() <= 1e-5 * want_nf4,
            "{case}: {nf4_err} vs {want_nf4}"
        );
        let mut errs = Vec::new();
        for it in 1..=5 {
            let cfg = LoftQConfig {
                loftq_bits: 4,
                loftq_iter: it,
            };
            let f = loftq_factors(&w, [m, n], r, &cfg, case).unwrap();
            let q = f.q.dequantize();
            let ba = matmul(&f.lora_b, &f.lora_a, m, r, n);
            let approx: Vec<f32> = q.iter().zip(&ba).map(|(a, b)| a + b).collect();
            errs.push(host::fro_diff(&w, &approx));
            if it == 1 || it == 5 {
                // Q: the same NF4 codes and scales as PEFT + bitsandbytes (no code flips).
                let (_, pq) = f32s(&st, &format!("{case}.iter{it}.q"));
                let flips = q
                    .iter()
                    .zip(&pq)
                    .filter(|(a, b)| (*a - *b).abs() > 1e-6)
                    .count();
                assert_eq!(flips, 0, "{case} iter {it}: {flips} values of Q differ");
                // B @ A (the factors themselves are defined up to the sign of each singular pair).
                let (_, pa) = f32s(&st, &format!("{case}.iter{it}.lora_A"));
                let (_, pb) = f32s(&st, &format!("{case}.iter{it}.lora_B"));
                let e = host::max_rel(&ba, &matmul(&pb, &pa, m, r, n));
                assert!(e <= 1e-4, "{case} iter {it}: B@A rel err {e}");
                eprintln!("{case} iter {it}: Q exact, B@A rel err {e:.2e}");
            }
        }
        for (i, (e, want)) in errs.iter().zip(&want_errs).enumerate() {
            let want = *want as f64;
            assert!(
                (e - want).abs() <= 1e-4 * want,
                "{case} iter {}: error {e} vs PEFT {want}",
                i + 1
            );
        }
        assert!(errs.windows(2).all(|p| p[1] < p[0]), "{case}: {errs:?}");
        assert!(errs[0] < nf4_err, "{case}: {errs:?} vs NF4 {nf4_err}");
        eprintln!("{case}: ||W - Q(W)|| = {nf4_err:.6}, LoftQ by iteration {errs:.6?}");
    }
}

#[test]
fn loftq_on_tiny_llama_matches_peft_base_adapter_and_logits() {
    let d = dir().join("llama");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("meta.json")).unwrap()).unwrap();
    let base_dir = fixtures()
        .join("llama")
        .join(meta["base"].as_str().unwrap());
    let cfg = LoraConfig::from_file(&d.join("adapter")).unwrap();
    let mut peft = PeftModel::new(load_base::<B>(&base_dir));
    let adapted = peft.add_adapter("default", &cfg).unwrap();
    assert_eq!(adapted.len(), meta["modules"].as_u64().unwrap() as usize);

    let base_st = SafetensorsFile::open(&d.join("base.safetensors")).unwrap();
    let ad_st =
        SafetensorsFile::open(&d.join("adapter").join("adapter_model.safetensors")).unwrap();
    let (mut worst_q, mut worst_ba) = (0f32, 0f32);
    for (path, layer) in peft.model.lora_linears() {
        assert!(layer.is_nf4(), "{path}");
        let (_, pq) = f32s(&base_st, &format!("{path}.weight"));
        worst_q = worst_q.max(host::max_abs_diff(&pt(layer.base_weight()), &pq));
        let ad = &layer.adapters[0];
        let ours = pt(ad.lora_a.val().matmul(ad.lora_b.val()));
        let key = format!("base_model.model.{path}");
        let (sa, pa) = f32s(&ad_st, &format!("{key}.lora_A.weight"));
        let (sb, pb) = f32s(&ad_st, &format!("{key}.lora_B.weight"));
        worst_ba = worst_ba.max(host::max_rel(&ours, &matmul(&pb, &pa, sb[0], sa[0], sa[1])));
    }
    assert!(worst_q <= 1e-6, "base (dequantized Q) max err {worst_q}");
    assert!(worst_ba <= 1e-4, "B@A max rel err {worst_ba}");

    let exp = SafetensorsFile::open(&d.join("expected.safetensors")).unwrap();
    let (ids, mask) = (
        int::<B, 2>(&exp, "input_ids"),
        int::<B, 2>(&exp, "attention_mask"),
    );
    let l = peft
        .model
        .forward(ids.clone(), Some(mask.clone()), &LoraCtx::default());
    let err = max_rel(
        masked(l.clone(), &mask),
        masked(float(&exp, "logits"), &mask),
    );
    eprintln!("LoftQ tiny Llama: base max err {worst_q:.2e}, B@A rel {worst_ba:.2e}, logits rel {err:.2e}");
    assert!(err <= 1e-4, "logits rel err {err}");

    // Saved with PEFT's keys, shapes and LoftQ config; loading it onto the original base runs
    // LoftQ again (as PEFT does) and gives the same logits.
    let out = std::env::temp_dir().join(format!("parity-loftq-{}", std::process::id()));
    peft.save_adapter(&out, "default").unwrap();
    let ours = SafetensorsFile::open(&out.join("adapter_model.safetensors")).unwrap();
    assert_eq!(ours.shapes(), ad_st.shapes());
    let saved = LoraConfig::from_file(&out).unwrap();
    assert_eq!(saved.loftq_config, cfg.loftq_config);
    let mut again = PeftModel::new(load_base::<B>(&base_dir));
    again.load_adapter(&out, "default").unwrap();
    let l2 = again
        .model
        .forward(ids, Some(mask.clone()), &LoraCtx::default());
    let err2 = max_rel(masked(l2, &mask), masked(l.clone(), &mask));
    assert!(
        err2 <= 1e-6,
        "reloaded LoftQ adapter: logits rel err {err2}"
    );

    // For scripts/check_rust_loftq.py: the adapter, the NF4 base written dequantized, the logits.
    if let Ok(export) = std::env::var("RUST_LOFTQ_EXPORT") {
        let export = Path::new(&export);
        peft.save_adapter(&export.join("adapter"), "default")
            .unwrap();
        peft.model
            .save_pretrained(&export.join("base"), llama::SaveDtype::F32)
            .unwrap();
        let logits = HostTensor {
            shape: l.dims().to_vec(),
            data: l.into_data().to_vec::<f32>().unwrap(),
        };
        let map = std::collections::BTreeMap::from([("logits".to_string(), logits)]);
        peft_lora::write_f32(&export.join("rust_logits.safetensors"), &map).unwrap();
    }
}
