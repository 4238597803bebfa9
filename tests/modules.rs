//! Behaviour of the ported modules beyond value parity: names, bad input, training-mode statistics.

use residual::models::conv_sds::{span_loss, ConvSdsHead, ConvSdsHeadConfig};
use residual::models::sid::{SidConfig, SidResidualBlock, StochasticDepth};
use residual::models::{layers::BiasInit, Inputs};
use residual::ModelConfig;
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

fn small_sid() -> serde_json::Value {
    serde_json::json!({
        "arch": "sid_classifier",
        "num_categories_list": [3, 7, 5],
        "num_numerical_features": 4,
        "num_text_features": 2,
        "text_input_size": 24,
        "embedding_size": 16,
        "hidden_size": 48,
        "intermediate_size": 80,
        "num_hidden_layers": 3,
        "num_labels": 5
    })
}

fn sid_inputs(batch: i64, categorical: Tensor) -> Inputs {
    let mut inputs = Inputs::new();
    inputs.insert("categorical".into(), categorical);
    inputs.insert(
        "numerical".into(),
        Tensor::randn([batch, 4], (Kind::Float, Device::Cpu)),
    );
    inputs.insert(
        "text".into(),
        Tensor::randn([batch, 2, 24], (Kind::Float, Device::Cpu)),
    );
    inputs
}

fn error_of(result: anyhow::Result<Tensor>) -> String {
    format!("{:#}", result.expect_err("expected an error"))
}

#[test]
fn variable_names_are_pytorch_state_dict_keys() {
    let vs = VarStore::new(Device::Cpu);
    let config = ConvSdsHeadConfig {
        n_layers: 2,
        input_size: 8,
        hidden_size: 6,
        num_labels: 2,
    };
    let _head = ConvSdsHead::new(vs.root(), &config);
    let mut names: Vec<String> = vs.variables().into_keys().collect();
    names.sort();
    let mut expected = vec![
        "classifier.weight".to_string(),
        "classifier.bias".to_string(),
    ];
    for i in 0..2 {
        for p in [
            "conv1.weight",
            "conv1.bias",
            "conv2.weight",
            "conv2.bias",
            "layer_norm.weight",
            "layer_norm.bias",
        ] {
            expected.push(format!("convs.{i}.{p}"));
        }
    }
    expected.sort();
    assert_eq!(names, expected);
    assert_eq!(
        vs.variables()["convs.1.conv1.weight"].size(),
        vec![16, 8, 3]
    );
}

#[test]
fn sid_offsets_buffer_is_cumulative_and_not_trainable() {
    let vs = VarStore::new(Device::Cpu);
    let _model = ModelConfig::from_value(small_sid())
        .unwrap()
        .build(vs.root())
        .unwrap();
    let offsets = &vs.variables()["model.embeddings.categorical_embedding_offsets"];
    assert_eq!(offsets.kind(), Kind::Int64);
    assert!(!offsets.requires_grad());
    assert_eq!(
        Vec::<i64>::try_from(offsets.view([-1])).unwrap(),
        vec![0, 3, 10]
    );
    // The first layer has no attention; the others have `attention.0` (a block) and `attention.1`.
    let vars = vs.variables();
    assert!(!vars
        .keys()
        .any(|k| k.starts_with("model.layers.0.attention")));
    assert_eq!(
        vars["model.layers.1.attention.1.weight"].size(),
        vec![9, 48]
    );
    assert_eq!(
        vars["model.layers.2.projection.weight"].size(),
        vec![48, 9 * 16]
    );
}

#[test]
fn sid_init_matches_the_original() {
    let vs = VarStore::new(Device::Cpu);
    let mut config = small_sid();
    config["embed_init_std"] = serde_json::json!(0.5);
    config["num_categories_list"] = serde_json::json!([4000]);
    let _model = ModelConfig::from_value(config)
        .unwrap()
        .build(vs.root())
        .unwrap();
    let vars = vs.variables();
    let table = &vars["model.embeddings.categorical_embeddings.weight"];
    let std = table.std(true).double_value(&[]);
    assert!((std - 0.5).abs() < 0.02, "embedding std {std}");
    let bias = &vars["model.layers.1.projection.bias"];
    assert_eq!(
        bias.abs().max().double_value(&[]),
        0.0,
        "SiD linears start with zero bias"
    );
    let w = &vars["model.layers.1.transform.0.feedforward.0.weight"];
    let bound = 1.0 / 48f64.sqrt();
    let max = w.abs().max().double_value(&[]);
    assert!(
        max <= bound && max > 0.9 * bound,
        "kaiming_uniform(a=sqrt 5) bound {bound}, max {max}"
    );
    let classifier_bias = &vars["classifier.bias"];
    assert!(
        classifier_bias.abs().max().double_value(&[]) > 0.0,
        "classifier keeps PyTorch's default init"
    );
}

#[test]
fn wrong_sequence_length_is_a_clear_error() {
    let config = ModelConfig::from_json(
        r#"{"arch": "conv_sds_head", "n_layers": 1, "input_size": 8, "hidden_size": 6}"#,
    )
    .unwrap();
    let vs = VarStore::new(Device::Cpu);
    let model = config.build(vs.root()).unwrap();
    let mut inputs = Inputs::new();
    inputs.insert(
        "input".into(),
        Tensor::zeros([2, 9, 6], (Kind::Float, Device::Cpu)),
    );
    let msg = error_of(model.forward_named(&inputs, false));
    assert!(
        msg.contains("expected shape [B, 8, 6]") && msg.contains("[2, 9, 6]"),
        "{msg}"
    );

    inputs.insert(
        "input".into(),
        Tensor::zeros([2, 8, 6], (Kind::Int64, Device::Cpu)),
    );
    let msg = error_of(model.forward_named(&inputs, false));
    assert!(
        msg.contains("expected Float, the model's dtype, got Int64"),
        "{msg}"
    );
    inputs.insert(
        "input".into(),
        Tensor::zeros([2, 8, 6], (Kind::Double, Device::Cpu)),
    );
    let msg = error_of(model.forward_named(&inputs, false));
    assert!(msg.contains("got Double"), "{msg}");
    inputs.insert(
        "input".into(),
        Tensor::zeros([1, 2, 8, 6], (Kind::Float, Device::Cpu)),
    );
    let msg = error_of(model.forward_named(&inputs, false));
    assert!(msg.contains("expected shape [B, 8, 6] or [8, 6]"), "{msg}");

    let msg = error_of(model.forward_named(&Inputs::new(), false));
    assert!(msg.contains("missing input `input`"), "{msg}");
}

/// `nn.Conv1d` takes an unbatched `[L, H]`, and so do ConvSDSLayer and ConvSDSHead: the result is
/// the batched one without its batch dimension.
#[test]
fn conv_sds_takes_unbatched_sequences_like_conv1d() {
    for json in [
        r#"{"arch": "conv_sds_head", "n_layers": 2, "input_size": 8, "hidden_size": 6, "num_labels": 3}"#,
        r#"{"arch": "conv_sds_layer", "input_size": 8, "hidden_dim": 6}"#,
    ] {
        let vs = VarStore::new(Device::Cpu);
        let model = ModelConfig::from_json(json)
            .unwrap()
            .build(vs.root())
            .unwrap();
        let x = Tensor::randn([8, 6], (Kind::Float, Device::Cpu));
        let run = |x: Tensor| {
            let mut inputs = Inputs::new();
            inputs.insert("input".into(), x);
            model.forward_named(&inputs, false).unwrap()
        };
        let unbatched = run(x.shallow_clone());
        let batched = run(x.unsqueeze(0));
        assert_eq!(unbatched.dim(), 2, "{json}");
        assert_eq!(unbatched, batched.squeeze_dim(0), "{json}");
        assert_eq!(run(x.unsqueeze(0).repeat([0, 1, 1])).size()[0], 0, "{json}");
    }
}

#[test]
fn forward_qa_splits_start_and_end() {
    let vs = VarStore::new(Device::Cpu);
    let config = ConvSdsHeadConfig {
        n_layers: 1,
        input_size: 8,
        hidden_size: 6,
        num_labels: 2,
    };
    let head = ConvSdsHead::new(vs.root(), &config);
    let x = Tensor::randn([3, 8, 6], (Kind::Float, Device::Cpu));
    let (start, end) = head.forward_qa(&x).unwrap();
    assert_eq!(start.size(), vec![3, 8]);
    let logits = head.try_forward(&x).unwrap();
    assert_eq!(tch::Tensor::stack(&[start, end], -1), logits);

    let three = ConvSdsHead::new(
        vs.root() / "other",
        &ConvSdsHeadConfig {
            num_labels: 3,
            ..config
        },
    );
    let msg = format!("{:#}", three.forward_qa(&x).unwrap_err());
    assert!(msg.contains("num_labels = 2"), "{msg}");
}

#[test]
fn span_loss_ignores_positions_beyond_the_sequence() {
    let start = Tensor::randn([2, 5], (Kind::Float, Device::Cpu));
    let end = Tensor::randn([2, 5], (Kind::Float, Device::Cpu));
    let inside = Tensor::from_slice(&[1i64, 3]);
    let one_out = Tensor::from_slice(&[1i64, 99]);
    let full = span_loss(&start, &end, &inside, &inside)
        .unwrap()
        .double_value(&[]);
    let partial = span_loss(&start, &end, &one_out, &inside)
        .unwrap()
        .double_value(&[]);
    let ce_row0 = start.get(0).log_softmax(0, Kind::Float).double_value(&[1]);
    let ce_end = end.log_softmax(1, Kind::Float);
    let end_loss = -(ce_end.double_value(&[0, 1]) + ce_end.double_value(&[1, 3])) / 2.0;
    assert!(
        (partial - (-ce_row0 + end_loss) / 2.0).abs() < 1e-6,
        "{partial}"
    );
    assert!((full - partial).abs() > 1e-6);
    let bad = span_loss(&start, &end, &Tensor::from_slice(&[1.0f32, 2.0]), &inside);
    assert!(format!("{:#}", bad.unwrap_err()).contains("start_positions must be int64"));
}

#[test]
fn sid_rejects_bad_inputs_by_name() {
    let vs = VarStore::new(Device::Cpu);
    let model = ModelConfig::from_value(small_sid())
        .unwrap()
        .build(vs.root())
        .unwrap();
    let ok = Tensor::from_slice(&[0i64, 6, 4, 2, 0, 1]).view([2, 3]);
    assert_eq!(
        model
            .forward_named(&sid_inputs(2, ok), false)
            .unwrap()
            .size(),
        vec![2, 5]
    );

    // As nn.Embedding: past its own feature's count but inside the shared table is read (the
    // next feature's rows); outside the table is refused, naming the entry.
    let next_features_rows = Tensor::from_slice(&[0i64, 6, 4, 2, 7, 1]).view([2, 3]);
    assert!(model
        .forward_named(&sid_inputs(2, next_features_rows), false)
        .is_ok());
    let out_of_table = Tensor::from_slice(&[0i64, 6, 4, 2, 1, 5]).view([2, 3]);
    let msg = error_of(model.forward_named(&sid_inputs(2, out_of_table), false));
    assert!(
        msg.contains("row 1, feature 2 has index 5, which with the feature's offset 10 is outside the embedding table [0, 15)"),
        "{msg}"
    );

    let negative = Tensor::from_slice(&[-1i64, 0, 4]).view([1, 3]);
    let msg = error_of(model.forward_named(&sid_inputs(1, negative), false));
    assert!(msg.contains("feature 0 has index -1"), "{msg}");

    let two_features = Tensor::zeros([2, 2], (Kind::Int64, Device::Cpu));
    let msg = error_of(model.forward_named(&sid_inputs(2, two_features), false));
    assert!(
        msg.contains("`categorical`: expected shape [B, 3]"),
        "{msg}"
    );

    let mut inputs = sid_inputs(2, Tensor::zeros([2, 3], (Kind::Int64, Device::Cpu)));
    inputs.insert(
        "text".into(),
        Tensor::zeros([2, 3, 24], (Kind::Float, Device::Cpu)),
    );
    let msg = error_of(model.forward_named(&inputs, false));
    assert!(msg.contains("`text`: expected shape [2, 2, 24]"), "{msg}");

    // PyTorch's dtypes: `numerical` is only multiplied by a weight, so anything that promotes to
    // float32 works; `text` meets an einsum and must be float32; indices any integer or bool.
    let categorical = Tensor::from_slice(&[0i64, 6, 4, 2, 0, 1]).view([2, 3]);
    let numerical = Tensor::from_slice(&[0i64, 3, -2, 1, 5, 0, 1, 2]).view([2, 4]);
    let text = Tensor::randn([2, 2, 24], (Kind::Float, Device::Cpu));
    let forward = |categorical: &Tensor, numerical: &Tensor, text: &Tensor| {
        let mut inputs = Inputs::new();
        inputs.insert("categorical".into(), categorical.shallow_clone());
        inputs.insert("numerical".into(), numerical.shallow_clone());
        inputs.insert("text".into(), text.shallow_clone());
        model.forward_named(&inputs, false)
    };
    let expected = forward(&categorical, &numerical.to_kind(Kind::Float), &text).unwrap();
    for kind in [Kind::Int, Kind::Uint8, Kind::Int16] {
        let got = forward(&categorical.to_kind(kind), &numerical, &text).unwrap();
        assert_eq!(got, expected, "categorical {kind:?}");
    }
    let flags = categorical.remainder(2);
    let got = forward(&flags.to_kind(Kind::Bool), &numerical, &text).unwrap();
    assert_eq!(
        got,
        forward(&flags, &numerical, &text).unwrap(),
        "categorical Bool"
    );
    for kind in [Kind::Bool, Kind::Half, Kind::BFloat16] {
        let numerical = numerical.to_kind(kind);
        let got = forward(&categorical, &numerical, &text).unwrap();
        let want = forward(&categorical, &numerical.to_kind(Kind::Float), &text).unwrap();
        assert_eq!(got, want, "numerical {kind:?}");
    }
    let msg = error_of(forward(
        &categorical,
        &numerical.to_kind(Kind::Double),
        &text,
    ));
    assert!(
        msg.contains("`numerical`: expected a dtype that promotes to the model's Float"),
        "{msg}"
    );
    let msg = error_of(forward(&categorical, &numerical, &text.to_kind(Kind::Half)));
    assert!(msg.contains("`text`: expected Float"), "{msg}");
    let msg = error_of(forward(
        &categorical.to_kind(Kind::Float),
        &numerical,
        &text,
    ));
    assert!(
        msg.contains("`categorical`: expected an integer or bool"),
        "{msg}"
    );
    let empty = |t: &Tensor| t.narrow(0, 0, 0);
    let none = forward(&empty(&categorical), &empty(&numerical), &empty(&text)).unwrap();
    assert_eq!(none.size(), vec![0, 5]);
}

#[test]
fn bad_configs_name_the_field() {
    let cases = [
        (
            serde_json::json!({"num_text_features": 0}),
            "num_text_features",
        ),
        (
            serde_json::json!({"num_categories_list": []}),
            "num_categories_list",
        ),
        (
            serde_json::json!({"hidden_dropout_prob": 1.5}),
            "hidden_dropout_prob",
        ),
        (serde_json::json!({"num_labels": null}), "num_labels"),
        (serde_json::json!({"hiden_size": 3}), "hiden_size"),
    ];
    for (patch, field) in cases {
        let mut config = small_sid();
        for (k, v) in patch.as_object().unwrap() {
            config[k] = v.clone();
        }
        let msg = format!("{:#}", ModelConfig::from_value(config).unwrap_err());
        assert!(msg.contains(field), "{field}: {msg}");
    }
    let msg = format!(
        "{:#}",
        ModelConfig::from_json(r#"{"arch": "conv_sds_head", "n_layers": 0}"#).unwrap_err()
    );
    assert!(msg.contains("n_layers: must be at least 1"), "{msg}");
    let msg = format!(
        "{:#}",
        ModelConfig::from_json(r#"{"arch": "resnet9000"}"#).unwrap_err()
    );
    assert!(msg.contains("resnet9000"), "{msg}");
}

#[test]
fn residual_block_dropout_keeps_and_scales_like_pytorch() {
    let p = 0.3;
    let vs = VarStore::new(Device::Cpu);
    let block = SidResidualBlock::new(vs.root(), 32, 64, p, BiasInit::Uniform);
    let h = Tensor::randn([512, 32], (Kind::Float, Device::Cpu));
    let eval_delta = block.forward_t(&h, false) - &h;
    tch::manual_seed(7);
    let train_delta = block.forward_t(&h, true) - &h;
    let kept = train_delta.ne(0.0);
    let n = kept.numel() as f64;
    let kept_fraction = kept
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[]);
    let sigma = (p * (1.0 - p) / n).sqrt();
    assert!(
        (kept_fraction - (1.0 - p)).abs() < 5.0 * sigma,
        "kept {kept_fraction}"
    );
    let scaled = (&eval_delta / (1.0 - p)).masked_select(&kept);
    let diff = (train_delta.masked_select(&kept) - scaled)
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        diff < 1e-5,
        "kept values are eval values / (1 - p); diff {diff}"
    );
}

#[test]
fn stochastic_depth_divides_kept_rows_by_p_as_the_original() {
    let p = 0.2;
    let depth = StochasticDepth { drop_path_prob: p };
    let x = Tensor::rand([4000, 3], (Kind::Float, Device::Cpu)) + 1.0;
    assert_eq!(depth.forward_t(&x, false), x);
    let y = depth.forward_t(&x, true);
    let kept_rows = y.ne(0.0).all_dim(1, false);
    let dropped_rows = y.eq(0.0).all_dim(1, false);
    assert_eq!(
        kept_rows.logical_or(&dropped_rows).all().int64_value(&[]),
        1,
        "whole rows are kept or dropped"
    );
    let kept = kept_rows
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[]);
    let sigma = (p * (1.0 - p) / 4000.0).sqrt();
    assert!(
        (kept - (1.0 - p)).abs() < 5.0 * sigma,
        "kept fraction {kept}"
    );
    let ratio = (y.index_select(0, &kept_rows.nonzero().squeeze_dim(1))
        / x.index_select(0, &kept_rows.nonzero().squeeze_dim(1)))
    .mean(Kind::Double)
    .double_value(&[]);
    assert!(
        (ratio - 1.0 / p).abs() < 1e-4,
        "kept rows scaled by 1/p, got {ratio}"
    );
}

#[test]
fn sid_train_mode_uses_dropout_and_eval_is_deterministic() {
    let vs = VarStore::new(Device::Cpu);
    let model = ModelConfig::from_value(small_sid())
        .unwrap()
        .build(vs.root())
        .unwrap();
    let inputs = sid_inputs(4, Tensor::zeros([4, 3], (Kind::Int64, Device::Cpu)));
    let a = model.forward_named(&inputs, false).unwrap();
    let b = model.forward_named(&inputs, false).unwrap();
    assert_eq!(a, b);
    let c = model.forward_named(&inputs, true).unwrap();
    assert!(
        (a - c).abs().max().double_value(&[]) > 1e-4,
        "train mode must apply dropout"
    );
}

#[test]
fn sid_config_defaults_are_the_originals() {
    let c: SidConfig = serde_json::from_value(serde_json::json!({
        "num_categories_list": [2], "num_numerical_features": 1,
        "num_text_features": 1, "text_input_size": 4
    }))
    .unwrap();
    assert_eq!(
        (
            c.embedding_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers
        ),
        (64, 256, 1024, 18)
    );
    assert_eq!((c.num_transform_blocks, c.num_attention_blocks), (1, 1));
    assert_eq!(
        (
            c.hidden_dropout_prob,
            c.attention_dropout_prob,
            c.drop_path_prob
        ),
        (0.5, 0.5, 0.5)
    );
    assert_eq!((c.embed_init_std, c.num_labels), (0.02, None));
}
