//! EVA against PEFT's `initialize_lora_eva_weights` on the same batches
//! (fixtures from `scripts/fixtures_eva.py`): the same rank allocation, the same
//! rank/alpha patterns, and the same subspaces (principal angles near zero).

use burn::tensor::{Int, Tensor, TensorData};
use peft_lora::linalg::{qr_thin, svd_top, to_mat};
use peft_lora::EvaLimits;
use peft_lora::SafetensorsFile;
use peft_lora::{LoraConfig, LoraCtx, LoraModel, PeftModel};

use super::{fixtures, float, load_base, B};
use test_support::st::i64s;

struct EvaBatch {
    ids: Tensor<B, 2, Int>,
    mask: Tensor<B, 2, Int>,
    mask_v: Vec<i64>,
    labels_v: Vec<i64>,
}

fn batches(st: &SafetensorsFile) -> Vec<EvaBatch> {
    let (shape, ids) = i64s(st, "input_ids");
    let (_, mask) = i64s(st, "attention_mask");
    let (_, labels) = i64s(st, "labels");
    let (n, b, s) = (shape[0], shape[1], shape[2]);
    (0..n)
        .map(|i| {
            let r = i * b * s..(i + 1) * b * s;
            let t = |v: &[i64]| {
                Tensor::from_data(TensorData::new(v.to_vec(), [b, s]), &Default::default())
            };
            EvaBatch {
                ids: t(&ids[r.clone()]),
                mask: t(&mask[r.clone()]),
                mask_v: mask[r.clone()].to_vec(),
                labels_v: labels[r].to_vec(),
            }
        })
        .collect()
}

/// Cosines of the principal angles between the row spaces of two `[k, in]` matrices.
fn principal_cosines(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Vec<f32> {
    let (qa, _) = qr_thin(to_mat(a.transpose()).as_ref());
    let (qb, _) = qr_thin(to_mat(b.transpose()).as_ref());
    let m = qa.transpose() * &qb;
    svd_top(m.as_ref(), m.nrows(), "angles").unwrap().s
}

#[test]
fn eva_matches_pefts_ranks_patterns_and_subspaces() {
    for case in ["eva_all_linear", "eva_whiten_qv"] {
        let dir = fixtures().join("eva").join(case);
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
        let base = fixtures()
            .join("llama")
            .join(meta["base"].as_str().unwrap());
        let cfg: LoraConfig = serde_json::from_value(meta["lora_config"].clone()).unwrap();
        let eva = cfg.eva_settings();
        let data = batches(&SafetensorsFile::open(&dir.join("batches.safetensors")).unwrap());
        let exp = SafetensorsFile::open(&dir.join("expected.safetensors")).unwrap();

        let mut peft = PeftModel::new(load_base::<B>(&base));
        peft.add_adapter("default", &cfg).unwrap();
        let mut seen = Vec::new();
        // Also checks the progress reports.
        let report = peft
            .eva_init(
                "default",
                data.iter(),
                |m, b| {
                    m.forward(b.ids.clone(), Some(b.mask.clone()), &LoraCtx::default());
                },
                |b| eva.token_mask(&b.mask_v, Some(&b.labels_v)),
                |p| seen.push(p),
                EvaLimits::default(),
            )
            .unwrap();
        let last = seen.last().unwrap();
        assert_eq!(
            last.converged, last.layers,
            "{case}: progress ends converged"
        );

        // Same rank per layer as PEFT.
        let want: std::collections::BTreeMap<String, usize> =
            serde_json::from_value(meta["ranks"].clone()).unwrap();
        let ours: std::collections::BTreeMap<String, usize> = report
            .ranks
            .iter()
            .filter(|(_, r)| **r > 0)
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        assert_eq!(ours, want, "{case}: rank allocation");
        eprintln!(
            "{case}: {} batches after the first (PEFT ran {} forwards in all)",
            report.batches, meta["forward_calls"]
        );

        // The config PEFT writes.
        let c = &peft.configs["default"];
        let rp: serde_json::Value = serde_json::to_value(&c.rank_pattern).unwrap();
        assert_eq!(rp, meta["rank_pattern"], "{case}: rank_pattern");
        let ap: std::collections::BTreeMap<String, f64> =
            serde_json::from_value(meta["alpha_pattern"].clone()).unwrap();
        assert_eq!(c.alpha_pattern, ap, "{case}: alpha_pattern");

        // Subspaces: principal angles near zero; whitened rows keep PEFT's norms.
        for (path, layer) in peft.model.lora_linears() {
            let Some(a) = layer.adapter("default") else {
                continue;
            };
            let ours = a.lora_a.val().transpose(); // [r, in]
            let theirs: Tensor<B, 2> = float(&exp, &format!("lora_A.{path}"));
            let cos = principal_cosines(ours.clone(), theirs.clone());
            let worst = cos.iter().cloned().fold(1f32, f32::min);
            assert!(worst >= 0.999, "{case}: {path}: principal cosines {cos:?}");
            let norms = |t: Tensor<B, 2>| -> Vec<f32> {
                t.powf_scalar(2.0)
                    .sum_dim(1)
                    .sqrt()
                    .into_data()
                    .to_vec()
                    .unwrap()
            };
            // Whitening divides component i by sqrt(s_i). PEFT 0.21 divides in place on a view
            // shared by the layers with identical inputs, so q_proj and v_proj (one SVD) both end
            // up divided by s_i: its norm is ours squared. We implement the documented rule.
            let shared = if eva.whiten { 2 } else { 1 };
            for (x, y) in norms(ours).iter().zip(norms(theirs)) {
                let x = x.powi(shared);
                assert!(
                    (x - y).abs() <= 1e-3 * y.abs().max(1e-3),
                    "{case}: {path}: row norm {x} vs {y}"
                );
            }
            assert_eq!(
                a.lora_b.val().abs().max().into_scalar(),
                0.0,
                "{case}: B starts at zero"
            );
        }

        // Saved: PEFT's keys and shapes.
        let out = std::env::temp_dir().join(format!("parity-eva-{}-{case}", std::process::id()));
        peft.save_adapter(&out, "default").unwrap();
        let ours = SafetensorsFile::open(&out.join("adapter_model.safetensors")).unwrap();
        let theirs =
            SafetensorsFile::open(&dir.join("adapter").join("adapter_model.safetensors")).unwrap();
        assert_eq!(
            ours.shapes(),
            theirs.shapes(),
            "{case}: saved keys and shapes"
        );
        let _ = std::fs::remove_dir_all(&out);
    }
}
