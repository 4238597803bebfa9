//! Data-parallel training on c10d: collectives between two local processes, a dead peer named in
//! the error, and `residual train` under torchrun matching one process and PyTorch DDP.

mod common;

use std::process::{Command, Output};

/// A port no one listens on now (the store binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `residual ARGS` as ranks 0..world of one group on 127.0.0.1, the way torchrun sets them.
fn spawn_ranks(world: usize, args: &[&str], env: &[(&str, &str)]) -> Vec<Output> {
    let port = free_port().to_string();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            let mut cmd = Command::new(common::residual_bin());
            cmd.args(args)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("RESIDUAL_DIST_TIMEOUT", "20");
            for (k, v) in env {
                cmd.env(k, v);
            }
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn gloo_or_skip() -> bool {
    if !residual::distributed::backends().gloo {
        println!("skipped: this build has no Gloo backend (install libgloo-dev and rebuild)");
        return false;
    }
    true
}

#[test]
fn two_processes_allreduce_broadcast_and_pass_a_barrier() {
    if !gloo_or_skip() {
        return;
    }
    let out = spawn_ranks(2, &["doctor", "--collectives"], &[]);
    for (rank, o) in out.iter().enumerate() {
        assert!(o.status.success(), "rank {rank}: {}", text(&o.stderr));
    }
    let report = text(&out[0].stdout);
    // Rank 0 holds 1 and rank 1 holds 2: both end with 3.
    assert!(
        report.contains("allreduce sum of rank+1: 3 on every rank"),
        "{report}"
    );
    assert!(
        report.contains("allreduce of 4194304 floats (16 MB): exact"),
        "{report}"
    );
    assert!(
        report.contains("200 allreduces in a row: exact"),
        "{report}"
    );
    assert!(report.contains("barrier: passed"), "{report}");
}

#[test]
fn a_dead_peer_is_an_error_that_names_its_rank() {
    if !gloo_or_skip() {
        return;
    }
    let start = std::time::Instant::now();
    // Rank 1 joins the group and exits before the first allreduce.
    let out = spawn_ranks(
        2,
        &["doctor", "--collectives"],
        &[("RESIDUAL_FAULT_EXIT", "1:1")],
    );
    assert_eq!(out[1].status.code(), Some(17));
    assert!(!out[0].status.success());
    let err = text(&out[0].stderr);
    assert!(
        err.contains("allreduce failed on rank 0 of 2") && err.contains("rank 1 has exited"),
        "{err}"
    );
    // The closed connection is noticed at once, long before the 20 s timeout.
    assert!(start.elapsed().as_secs() < 15, "took {:?}", start.elapsed());
}

#[test]
fn nccl_is_built_where_cuda_is_linked() {
    if tch::Cuda::device_count() == 0 {
        println!("skipped: no CUDA device");
        return;
    }
    assert!(
        residual::distributed::backends().nccl,
        "a CUDA host runs a build without NCCL"
    );
}
