//! Base and adapter rows in one generation batch (what `news2stock eval` runs): each row's
//! greedy tokens equal those of generating it alone with the adapter disabled or enabled.

use burn::backend::NdArray;
use llama::{GenerationConfig, LlamaConfig, LlamaForCausalLM};
use peft_lora::{LoraConfig, LoraCtx, LoraModel, PeftModel};

type B = NdArray<f32>;

#[test]
fn base_and_adapter_rows_in_one_batch_generate_as_alone() {
    let dev = Default::default();
    let model = LlamaForCausalLM::<B>::random_seeded(&LlamaConfig::tiny(40), &dev, 11);
    let mut peft = PeftModel::new(model);
    peft.add_adapter(
        "default",
        &LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"]),
    )
    .unwrap();
    // B starts at zero: make the adapter change the outputs.
    for (_, l) in peft.model.lora_linears_mut() {
        if let Some(a) = l.adapters.first_mut() {
            a.lora_b = burn::module::Param::from_tensor(a.lora_b.val().ones_like() * 0.3);
        }
    }
    // Prompts of different lengths (left padding differs between the batches).
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 5, 9, 3, 4, 6, 2],
        vec![1, 7, 8],
        vec![1, 12, 30, 22, 9],
    ];
    let gen = GenerationConfig {
        max_new_tokens: 8,
        stop_ids: vec![2],
        pad_id: 0,
        ..Default::default()
    };
    let k = prompts.len();
    let rows: Vec<Vec<u32>> = prompts.iter().chain(&prompts).cloned().collect();
    let ctx = LoraCtx {
        row_adapters: Some(
            (0..2 * k)
                .map(|r| (r >= k).then(|| "default".to_string()))
                .collect(),
        ),
        ..Default::default()
    };
    let mixed = peft
        .model
        .generate(&rows, &gen, &ctx, &mut |_, _| {})
        .unwrap();

    let alone = |p: &PeftModel<B, LlamaForCausalLM<B>>, gen: &GenerationConfig| -> Vec<Vec<u32>> {
        prompts
            .iter()
            .map(|q| {
                p.model
                    .generate(
                        std::slice::from_ref(q),
                        gen,
                        &LoraCtx::default(),
                        &mut |_, _| {},
                    )
                    .unwrap()
                    .remove(0)
            })
            .collect()
    };
    let tuned = alone(&peft, &gen);
    peft.set_adapters_disabled(true).unwrap();
    let base = alone(&peft, &gen);
    assert_ne!(
        base, tuned,
        "the adapter must change some output for the test to mean anything"
    );
    assert_eq!(&mixed[..k], &base[..]);
    assert_eq!(&mixed[k..], &tuned[..]);

    // Rows that stop early leave the batch (generate drops them once half the batch is done,
    // routing and all); the rows left generate what they generate alone. The stop ids are the
    // first tokens of prompts 0 and 2 (not of prompt 1), so that most rows, not all, stop.
    let firsts = |o: &[Vec<u32>]| -> Vec<u32> {
        let keep = o[1][0];
        [o[0][0], o[2][0]]
            .into_iter()
            .filter(|t| *t != keep)
            .collect()
    };
    let mut stop_ids: Vec<u32> = firsts(&base).into_iter().chain(firsts(&tuned)).collect();
    stop_ids.dedup();
    let early = GenerationConfig {
        stop_ids,
        ..gen.clone()
    };
    let base = alone(&peft, &early);
    peft.set_adapters_disabled(false).unwrap();
    let tuned = alone(&peft, &early);
    let mixed = peft
        .model
        .generate(&rows, &early, &ctx, &mut |_, _| {})
        .unwrap();
    let stopped = mixed.iter().filter(|o| o.len() < 8).count();
    assert!(
        2 * stopped >= mixed.len() && stopped < mixed.len(),
        "the test needs half the rows, not all, to stop early: {mixed:?}"
    );
    assert_eq!(&mixed[..k], &base[..]);
    assert_eq!(&mixed[k..], &tuned[..]);
}
