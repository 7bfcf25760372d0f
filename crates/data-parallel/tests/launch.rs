//! The launcher with `/bin/sh -c` scripts as children: success, one failure stopping the
//! others, and the variables every child gets.

use std::fs;
use std::time::{Duration, Instant};

use data_parallel::{free_port, launch, Error, LaunchSpec, World, KILL_GRACE};

fn sh(nproc: usize, script: &str) -> LaunchSpec {
    LaunchSpec {
        nproc_per_node: nproc,
        nnodes: 1,
        node_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: free_port().unwrap(),
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env: Vec::new(),
    }
}

#[test]
fn every_child_succeeding_is_ok() {
    launch(&sh(3, "test \"$RANK\" -lt 3 && test \"$WORLD_SIZE\" = 3")).unwrap();
}

#[test]
fn one_failing_child_stops_the_others_and_is_named() {
    // Ranks 0 and 2 would sleep for a minute; rank 1 fails at once.
    let spec = sh(
        3,
        "if [ \"$RANK\" = 1 ]; then sleep 0.2; exit 3; fi; exec sleep 60",
    );
    let start = Instant::now();
    let e = launch(&spec).unwrap_err();
    let took = start.elapsed();
    // `launch` reaps every child before returning, so returning well before 60 s means the
    // sleepers were killed.
    assert!(took < KILL_GRACE + Duration::from_secs(20), "took {took:?}");
    assert!(
        took >= KILL_GRACE,
        "the others get a grace period first ({took:?})"
    );
    match &e {
        Error::ChildFailed {
            rank: 1,
            local_rank: 1,
            status,
        } => assert_eq!(status.code(), Some(3)),
        other => panic!("expected rank 1 named, got {other}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("rank 1") && msg.contains('3'), "{msg}");
}

#[test]
fn children_that_exit_on_their_own_during_the_grace_are_not_blamed() {
    // Rank 0 fails; rank 1 notices (here: a short sleep) and exits 1 itself, as a watchdog would.
    let spec = sh(
        2,
        "if [ \"$RANK\" = 0 ]; then exit 7; fi; sleep 0.5; exit 1",
    );
    let start = Instant::now();
    let e = launch(&spec).unwrap_err();
    assert!(
        start.elapsed() < KILL_GRACE,
        "no kill needed: {:?}",
        start.elapsed()
    );
    assert!(
        matches!(&e, Error::ChildFailed { rank: 0, status, .. } if status.code() == Some(7)),
        "{e}"
    );
}

#[test]
fn children_get_the_rank_variables_and_the_extra_env() {
    let dir = test_support::fresh_temp_dir("data-parallel", "launch-env");
    let script = format!(
        "printf '%s\\n' \"$RANK\" \"$WORLD_SIZE\" \"$LOCAL_RANK\" \"$LOCAL_WORLD_SIZE\" \
         \"$MASTER_ADDR\" \"$MASTER_PORT\" \"$NCCL_NVLS_ENABLE\" \"$DP_TEST_EXTRA\" > '{}'/rank$RANK",
        dir.display()
    );
    let mut spec = sh(2, &script);
    spec.nnodes = 3;
    spec.node_rank = 1;
    spec.master_addr = "node0.example".into();
    spec.env = vec![
        ("DP_TEST_EXTRA".into(), "hello world".into()),
        ("RANK".into(), "99".into()),
    ];
    launch(&spec).unwrap();
    let nvls = std::env::var("NCCL_NVLS_ENABLE").unwrap_or_else(|_| "0".into());
    for local in 0..2 {
        let rank = 2 + local;
        let got = fs::read_to_string(dir.join(format!("rank{rank}"))).unwrap();
        let want = format!(
            "{rank}\n6\n{local}\n2\nnode0.example\n{}\n{nvls}\nhello world\n",
            spec.master_port
        );
        assert_eq!(got, want);
    }
}

#[test]
fn what_a_child_gets_is_what_world_from_env_reads() {
    let dir = test_support::fresh_temp_dir("data-parallel", "launch-world");
    let out = dir.join("env");
    let script = format!("env | grep -E '^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT)=' > '{}'", out.display());
    let mut spec = sh(1, &script);
    spec.nnodes = 2;
    spec.node_rank = 1;
    launch(&spec).unwrap();
    let text = fs::read_to_string(&out).unwrap();
    let world = World::from_vars(|name| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
            .map(str::to_string)
    })
    .unwrap()
    .unwrap();
    assert_eq!(
        world,
        World {
            rank: 1,
            world_size: 2,
            local_rank: 0,
            local_world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: spec.master_port,
        }
    );
}

#[test]
fn a_missing_program_and_a_bad_spec_are_errors() {
    let mut spec = sh(2, "exit 0");
    spec.program = "/nonexistent/data-parallel-child".into();
    let e = launch(&spec).unwrap_err();
    assert!(matches!(&e, Error::Spawn { rank: 0, .. }), "{e}");
    assert!(
        e.to_string().contains("/nonexistent/data-parallel-child"),
        "{e}"
    );

    let mut spec = sh(2, "exit 0");
    spec.node_rank = 1;
    let e = launch(&spec).unwrap_err();
    assert!(
        matches!(
            &e,
            Error::LaunchSpec {
                field: "node_rank",
                ..
            }
        ),
        "{e}"
    );
    let mut spec = sh(0, "exit 0");
    spec.nproc_per_node = 0;
    assert!(matches!(
        launch(&spec),
        Err(Error::LaunchSpec {
            field: "nproc_per_node",
            ..
        })
    ));
}
