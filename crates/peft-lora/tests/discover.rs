//! `#[derive(LoraModel)]`: the layers of a model are found by the names Burn records (checked
//! against Burn's own `ModuleVisitor` paths), nested structs, `Vec`, `Option` and other fields
//! included, heads kept apart, and the model then adapts, saves and loads as a hand-written
//! `LoraModel` would.

use burn::backend::NdArray;
use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::{LinearConfig, Relu};
use burn::tensor::{backend::Backend, Distribution, Tensor};
use peft_lora::{LoraConfig, LoraLinear, LoraModel, PeftModel, TrainableTokens};
use test_support::{fresh_temp_dir, max_abs_diff};

type B = NdArray<f32>;

#[derive(Module, Debug, LoraModel)]
struct Block<B: Backend> {
    proj: LoraLinear<B>,
    norm: Param<Tensor<B, 1>>,
    act: Relu,
}

#[derive(Module, Debug, LoraModel)]
struct Encoder<B: Backend> {
    fc1: LoraLinear<B>,
    blocks: Vec<Block<B>>,
    fc2: Option<LoraLinear<B>>,
}

#[derive(Module, Debug, LoraModel)]
struct Net<B: Backend> {
    embed: TrainableTokens<B>,
    encoder: Encoder<B>,
    #[lora(head)]
    head: LoraLinear<B>,
    #[module(skip)]
    width: usize,
}

impl<B: Backend> Net<B> {
    fn new(device: &B::Device) -> Self {
        let lin = |i, o| LoraLinear::from(LinearConfig::new(i, o).init::<B>(device));
        Net {
            embed: TrainableTokens::from_weight(Tensor::random(
                [9, 4],
                Distribution::Normal(0.0, 1.0),
                device,
            )),
            encoder: Encoder {
                fc1: lin(4, 6),
                blocks: (0..2)
                    .map(|_| Block {
                        proj: lin(6, 6),
                        norm: Param::from_tensor(Tensor::ones([6], device)),
                        act: Relu::new(),
                    })
                    .collect(),
                fc2: Some(lin(6, 5)),
            },
            head: lin(5, 3),
            width: 4,
        }
    }

    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let mut h = self.encoder.fc1.forward(x);
        for b in &self.encoder.blocks {
            h = b.act.forward(b.proj.forward(h)) * b.norm.val().unsqueeze_dim(0);
        }
        let h = self
            .encoder
            .fc2
            .as_ref()
            .map_or(h.clone(), |f| f.forward(h));
        self.head.forward(h)
    }
}

/// Burn's own names of every float parameter (`a.b.0.weight`).
#[derive(Default)]
struct Paths {
    stack: Vec<String>,
    params: Vec<String>,
}

impl<B: Backend> ModuleVisitor<B> for Paths {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.stack.pop();
    }
    fn visit_float<const D: usize>(&mut self, _: &Param<Tensor<B, D>>) {
        self.params.push(self.stack.join("."));
    }
}

#[test]
fn layers_are_found_by_the_names_burn_records() {
    let device = Default::default();
    let mut net = Net::<B>::new(&device);
    let linears: Vec<String> = net.lora_linears().into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        linears,
        vec![
            "encoder.fc1",
            "encoder.blocks.0.proj",
            "encoder.blocks.1.proj",
            "encoder.fc2"
        ]
    );
    let heads: Vec<String> = net.head_linears().into_iter().map(|(p, _)| p).collect();
    assert_eq!(heads, vec!["head"]);
    let tables: Vec<String> = net.token_tables().into_iter().map(|(p, _)| p).collect();
    assert_eq!(tables, vec!["embed"]);
    let mut burn_paths = Paths::default();
    net.visit(&mut burn_paths);
    for p in linears.iter().chain(&heads).chain(&tables) {
        let weight = format!("{p}.weight");
        assert!(
            burn_paths.params.contains(&weight),
            "{weight} is not a Burn record path: {:?}",
            burn_paths.params
        );
    }
    // The mutable walk finds the same layers, and they are the model's own.
    let mut_paths: Vec<String> = net.lora_linears_mut().into_iter().map(|(p, _)| p).collect();
    assert_eq!(mut_paths, linears);
    for (_, l) in net.head_linears_mut() {
        l.state.module = Some("touched".into());
    }
    assert_eq!(net.head.state.module.as_deref(), Some("touched"));
    assert_eq!(net.width, 4);
}

#[test]
fn a_derived_model_adapts_saves_and_loads() {
    let device = Default::default();
    let mut peft = PeftModel::new(Net::<B>::new(&device));
    let mut cfg = LoraConfig::new(2, 4.0, &["all-linear"]);
    assert_eq!(
        cfg.target_modules,
        Some(peft_lora::TargetModules::Regex("all-linear".into()))
    );
    assert_eq!(cfg.task_type, None);
    cfg.modules_to_save = Some(vec!["head".into()]);
    let adapted = peft.add_adapter("default", &cfg).unwrap();
    // "all-linear" never adapts a head; modules_to_save trains a copy of it.
    assert_eq!(adapted.len(), 4);
    assert!(peft.model.head.adapters.is_empty() && peft.model.head.saved.get("default").is_some());
    for (_, l) in peft.model.lora_linears_mut() {
        let a = &mut l.adapters[0];
        a.lora_b = Param::from_tensor(a.lora_b.val().random_like(Distribution::Normal(0.0, 0.5)));
    }
    let x = Tensor::random([3, 4], Distribution::Normal(0.0, 1.0), &device);
    let out = peft.model.forward(x.clone());
    let dir = fresh_temp_dir("peft-lora-discover", "save");
    peft.save_adapter(&dir, "default").unwrap();
    // The same frozen base, without adapters or copies.
    let base = PeftModel::new(peft.model.clone()).unload().unwrap();
    let mut again = PeftModel::new(base);
    again.load_adapter(&dir, "default").unwrap();
    assert_eq!(max_abs_diff(again.model.forward(x), out), 0.0);
}
