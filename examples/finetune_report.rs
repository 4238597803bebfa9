//! The fine-tuning demonstration's report (`make finetune-demo`): for each run folder trained on
//! the same image folder, its validation accuracy per epoch, the confusion matrix of its final
//! weights on the validation images (class names from the folder), its training images/s; a plot
//! of validation error per epoch, all runs on one chart.
//!
//! `finetune_report DATA OUT NAME=RUN [NAME=RUN ...]`: writes OUT/report.md and OUT/val_error.png
//! and prints the report.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use residual::analysis::plot::{draw, Panel, Series, COLORS};
use residual::train::{confusion, latest_weights, load_model, RunData, RunDir, TrainOptions};
use residual::ModelConfig;
use tch::Device;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: finetune_report DATA OUT NAME=RUN [NAME=RUN ...]";
    anyhow::ensure!(args.len() >= 3, "{usage}");
    let (data, out) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]));
    let runs: Vec<(&str, PathBuf)> = args[2..]
        .iter()
        .map(|a| {
            let (name, run) = a.split_once('=').context(usage)?;
            Ok((name, PathBuf::from(run)))
        })
        .collect::<Result<_>>()?;
    std::fs::create_dir_all(&out)?;
    let mut report = String::from("# Fine-tuning demonstration\n\n");
    let mut series = Vec::new();
    let mut val = None;
    for (i, (name, run)) in runs.iter().enumerate() {
        let options: TrainOptions = serde_json::from_str(
            &std::fs::read_to_string(run.join("run.json"))
                .with_context(|| format!("{} is not a run folder", run.display()))?,
        )?;
        let config = ModelConfig::from_file(&run.join("model.json"))?;
        // The validation images, decoded once with the first run's evaluation transform.
        let data: &RunData = match &val {
            Some(d) => d,
            None => val.insert(RunData::from_image_folder(&data, &options, Device::Cpu)?),
        };
        let classes = data.classes.clone().unwrap_or_default();
        let (_vs, model) = load_model(&config, &latest_weights(run)?, Device::Cpu, false)?;
        let (error, matrix) = confusion(model.as_ref(), &data.test, &data.normalizer, 256)?;
        let metrics = RunDir::new(run).read_metrics()?;
        let per_epoch: Vec<String> = metrics
            .iter()
            .map(|m| format!("{:.1}%", 100.0 * (1.0 - m.test_error.unwrap_or(f64::NAN))))
            .collect();
        let seconds: f64 = metrics.iter().map(|m| m.seconds).sum();
        let rate = metrics
            .iter()
            .map(|m| m.images_per_second)
            .fold(0.0, f64::max);
        writeln!(
            report,
            "## {name} ({})\n\nvalidation accuracy {:.2}% on {} images after {} epochs \
             (per epoch: {}); training {seconds:.0} s, up to {rate:.0} images/s\n",
            run.display(),
            100.0 * (1.0 - error),
            data.test.len(),
            metrics.len(),
            per_epoch.join(", ")
        )?;
        writeln!(
            report,
            "confusion matrix (rows: true class, columns: predicted):\n"
        )?;
        writeln!(report, "| | {} |", classes.join(" | "))?;
        writeln!(report, "|---{}|", "|---:".repeat(classes.len()))?;
        for (c, row) in classes.iter().zip(&matrix) {
            let cells: Vec<String> = row.iter().map(i64::to_string).collect();
            writeln!(report, "| {c} | {} |", cells.join(" | "))?;
        }
        report.push('\n');
        series.push(Series {
            label: name.to_string(),
            points: metrics
                .iter()
                .map(|m| (m.epoch as f64, 100.0 * m.test_error.unwrap_or(f64::NAN)))
                .collect(),
            band: Vec::new(),
            dashed: false,
            color: COLORS[i % COLORS.len()],
        });
    }
    let plot = out.join("val_error.png");
    draw(
        &plot,
        &[Panel {
            title: "validation error".into(),
            x_desc: "epoch".into(),
            y_desc: "error (%)".into(),
            series,
        }],
        640,
        420,
    )?;
    writeln!(report, "plot: {}", plot.display())?;
    write(&out.join("report.md"), &report)?;
    print!("{report}");
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}
