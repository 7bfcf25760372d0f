//! `peft-lora` on your own Burn model (not a Llama): a 2-layer MLP classifier with modules
//! `encoder.fc1`, `encoder.fc2` and `head`, on a synthetic task. LoRA on fc1/fc2, the head
//! trained whole through `modules_to_save`; two named adapters (two tasks) trained until the
//! loss falls, saved in PEFT's format, reloaded, switched and merged; all of it for plain LoRA,
//! DoRA and rsLoRA. Every check is printed; a failed one exits with an error.
//!
//! ```sh
//! cargo run --release -p peft-lora --example custom_model
//! ```
//!
//! The lines that concern `peft-lora` are marked `// peft`: adopting it changes the field type
//! of each linear (`Linear` -> `LoraLinear`) and adds `LoraModel` to the derive; the rest is a
//! plain Burn model and a plain training loop.

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::LinearConfig;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, ElementConversion, Int, Tensor};
// peft: the whole API used here
use peft_lora::{AdamWConfig, LoraConfig, LoraLinear, LoraModel, LoraOptimizer};
use peft_lora::{OptimizerKind, PeftModel}; // peft

type B = Autodiff<NdArray>;
type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const D_IN: usize = 16;
const HIDDEN: usize = 64;
const CLASSES: usize = 4;

#[derive(Module, Debug, LoraModel)] // peft: LoraModel finds the layers by their field names
struct Encoder<B: Backend> {
    fc1: LoraLinear<B>, // peft: was burn::nn::Linear<B>
    fc2: LoraLinear<B>, // peft
}

#[derive(Module, Debug, LoraModel)] // peft
struct Classifier<B: Backend> {
    encoder: Encoder<B>,
    head: LoraLinear<B>, // peft
}

impl<B: Backend> Classifier<B> {
    fn new(device: &B::Device) -> Self {
        let linear = |i, o| LinearConfig::new(i, o).init::<B>(device).into(); // peft: .into()
        Classifier {
            encoder: Encoder {
                fc1: linear(D_IN, HIDDEN),
                fc2: linear(HIDDEN, HIDDEN),
            },
            head: linear(HIDDEN, CLASSES),
        }
    }

    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let h = burn::tensor::activation::relu(self.encoder.fc1.forward(x));
        let h = burn::tensor::activation::relu(self.encoder.fc2.forward(h));
        self.head.forward(h)
    }
}

/// Inputs and their classes.
struct Data {
    x: Tensor<B, 2>,
    y: Tensor<B, 1, Int>,
}

/// A synthetic task: the class a random linear teacher picks for a Gaussian input; a training
/// set and a held-out set.
struct Task {
    train: Data,
    test: Data,
}

impl Task {
    fn new(device: &burn::backend::ndarray::NdArrayDevice) -> Self {
        let teacher =
            Tensor::<B, 2>::random([D_IN, CLASSES], Distribution::Normal(0.0, 1.0), device);
        let data = |n| {
            let x = Tensor::<B, 2>::random([n, D_IN], Distribution::Normal(0.0, 1.0), device);
            let y = x.clone().matmul(teacher.clone()).argmax(1).reshape([n]);
            Data { x, y }
        };
        Task {
            train: data(512),
            test: data(512),
        }
    }

    fn loss(&self, model: &Classifier<B>) -> Tensor<B, 1> {
        let ce = CrossEntropyLossConfig::new().init(&self.train.x.device());
        ce.forward(model.forward(self.train.x.clone()), self.train.y.clone())
    }

    /// Accuracy on the held-out set.
    fn accuracy(&self, model: &Classifier<B>) -> f32 {
        let n = self.test.y.dims()[0];
        let pred = model.forward(self.test.x.clone()).argmax(1).reshape([n]);
        pred.equal(self.test.y.clone())
            .float()
            .mean()
            .into_scalar()
            .elem()
    }
}

fn check(ok: bool, what: String) -> Result<()> {
    println!("  [{}] {what}", if ok { "ok" } else { "FAILED" });
    if ok {
        Ok(())
    } else {
        Err(what.into())
    }
}

/// Trains the active adapter on `task`; returns the first and last loss.
fn train(peft: &mut PeftModel<B, Classifier<B>>, task: &Task, steps: usize) -> (f32, f32) {
    let mut opt = LoraOptimizer::new(OptimizerKind::AdamW, AdamWConfig::default()); // peft
    peft.train(); // peft
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let loss = task.loss(&peft.model);
        losses.push(loss.clone().into_scalar().elem::<f32>());
        opt.step_grads(&mut peft.model, &loss.backward(), 1e-2); // peft
    }
    peft.eval(); // peft
    (losses[0], losses[steps - 1])
}

fn run(variant: &str, cfg: &LoraConfig, base: &Classifier<B>, tasks: &[Task; 2]) -> Result<()> {
    println!("{variant}:");
    let dir = std::env::temp_dir().join(format!("peft-lora-custom-model-{variant}"));
    let mut peft = PeftModel::new(base.clone()); // peft
    let mut saved = Vec::new();
    for (name, task) in ["task_a", "task_b"].iter().zip(tasks) {
        peft.add_adapter(name, cfg)?; // peft
        peft.set_active(&[name])?; // peft
        let (first, last) = train(&mut peft, task, 150);
        check(
            last < 0.5 * first,
            format!("{name}: loss falls {first:.3} -> {last:.3}"),
        )?;
        saved.push(peft.save_adapter(&dir, name)?); // peft: PEFT's files, in dir/<name>/
    }

    // Reload both adapters into a fresh copy of the base: the same outputs.
    let mut loaded = PeftModel::new(base.clone()); // peft
    loaded.load_adapter(&saved[0], "task_a")?; // peft
    loaded.load_adapter(&saved[1], "task_b")?; // peft
    let x = tasks[0].test.x.clone();
    for name in ["task_a", "task_b"] {
        peft.set_active(&[name])?; // peft
        loaded.set_active(&[name])?; // peft
        let diff = max_diff(
            peft.model.forward(x.clone()),
            loaded.model.forward(x.clone()),
        );
        check(
            diff == 0.0,
            format!("{name}: reloaded outputs equal (max diff {diff:e})"),
        )?;
    }

    // Switching adapters switches the task (the head copy included).
    for (i, name) in ["task_a", "task_b"].iter().enumerate() {
        loaded.set_active(&[name])?; // peft
        let (own, other) = (
            tasks[i].accuracy(&loaded.model),
            tasks[1 - i].accuracy(&loaded.model),
        );
        check(
            own > 0.8 && own > other,
            format!(
                "{name} active: held-out accuracy {own:.2} on its task, {other:.2} on the other"
            ),
        )?;
    }
    let base_acc = tasks[1].accuracy(base);
    check(
        base_acc < 0.5,
        format!("base model: held-out accuracy {base_acc:.2} on task_b"),
    )?;

    // Merge task_b into the weights: a plain Classifier with the same outputs.
    let unmerged = loaded.model.forward(x.clone());
    let merged = loaded.merge_and_unload(true)?; // peft
    let diff = max_diff(merged.forward(x), unmerged);
    check(
        diff < 1e-4,
        format!("merged model matches the adapter (max diff {diff:.1e})"),
    )?;
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

fn max_diff(a: Tensor<B, 2>, b: Tensor<B, 2>) -> f32 {
    (a - b).abs().max().into_scalar().elem()
}

fn main() -> Result<()> {
    let device = Default::default();
    B::seed(&device, 17);
    let base = Classifier::<B>::new(&device);
    let tasks = [Task::new(&device), Task::new(&device)];
    let mut cfg = LoraConfig::new(8, 16.0, &["fc1", "fc2"]); // peft
    cfg.modules_to_save = Some(vec!["head".into()]); // peft: the head trains whole
    run("lora", &cfg, &base, &tasks)?;
    run(
        "dora",
        &LoraConfig {
            use_dora: true,
            ..cfg.clone()
        },
        &base,
        &tasks,
    )?; // peft
    run(
        "rslora",
        &LoraConfig {
            use_rslora: true,
            ..cfg
        },
        &base,
        &tasks,
    )?; // peft
    println!("all checks passed");
    Ok(())
}
