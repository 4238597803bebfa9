//! `residual doctor`.

use std::process::ExitCode;

use anyhow::Result;
use residual::doctor::Report;

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Under torchrun (or with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set): join the process
    /// group and check allreduce (small, large, repeated), broadcast and barrier.
    #[arg(long)]
    collectives: bool,
    /// With --collectives: cpu (Gloo) or cuda (NCCL, each rank on cuda:LOCAL_RANK).
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl Args {
    pub fn run(&self) -> Result<ExitCode> {
        if self.collectives {
            return check_collectives(&self.device);
        }
        let report = Report::collect();
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            for line in report.lines() {
                println!("{line}");
            }
        }
        report.check()?;
        Ok(ExitCode::SUCCESS)
    }
}

fn check_collectives(device: &str) -> Result<ExitCode> {
    use residual::distributed::{self, Backend, LaunchEnv, ProcessGroup};
    let Some(env) = LaunchEnv::from_env()? else {
        anyhow::bail!("--collectives runs under torchrun (WORLD_SIZE is not set)");
    };
    // Fault injection for the tests: exit before joining (step 0) or right after (step 1).
    let exit_at = distributed::injected_exit(&env);
    if exit_at == Some(0) {
        std::process::exit(17);
    }
    let device = env.device(residual::device::parse_device(device)?);
    residual::device::check_available(device)?;
    let backend = Backend::for_device(device);
    let group = ProcessGroup::init(&env, backend, distributed::default_timeout()?)?;
    if exit_at == Some(1) {
        std::process::exit(17);
    }
    let lines = distributed::check_collectives(&group, device, 1 << 24, 200)?;
    if env.rank == 0 {
        println!("{backend:?}, world size {}:", env.world_size);
        for line in lines {
            println!("  {line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
