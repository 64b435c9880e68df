//! The fuzz targets in `make test`: a few hundred cases of each (a smoke run that proves
//! each target runs and finds nothing in its first inputs), then every saved regression
//! input in `tests/fuzz-regressions/<target>/`, and the connection-abuse check. `make
//! fuzz` runs the same targets at volume.

use std::{sync::Arc, time::Duration};

use cluster_tests::fuzz::{
    regression_dir,
    run::{run_target, Budget},
    Fuzzer, Target, Worker,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_target_survives_its_first_cases_and_every_saved_regression() {
    let fuzzer = Arc::new(Fuzzer::start().await.expect("cluster starts"));
    let budget = Budget { cases: 300, time: Duration::from_secs(60), workers: 2, seed: 0x7e57 };
    for target in Target::ALL {
        let report = run_target(Arc::clone(&fuzzer), target, budget).await;
        assert!(report.cases >= 300, "{}: only {} cases", target.name(), report.cases);
        let crashes: Vec<&str> = report.crashes.iter().map(|crash| crash.what.as_str()).collect();
        assert_eq!(report.crashed, 0, "{}: {crashes:?}", target.name());
        // Every target can tell a good input from a bad one (the checks are not vacuous).
        if !matches!(target, Target::WireHttp2) {
            assert!(report.refused > 0, "{}: nothing refused in {} cases", target.name(), report.cases);
        }
    }
    let mut replayed = 0;
    for target in Target::ALL {
        let Ok(entries) = std::fs::read_dir(regression_dir().join(target.name())) else { continue };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|extension| extension == "bin") {
                let input = std::fs::read(&path).unwrap();
                let verdict = fuzzer.run_case(target, &input, &mut Worker::new(0)).await;
                assert!(verdict.is_ok(), "{}: {verdict:?}", path.display());
                replayed += 1;
            }
        }
    }
    println!("replayed {replayed} regression inputs");
    fuzzer.still_serving().await.expect("the orchestrator still serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_requests_are_served_in_time_while_a_thousand_idle_connections_are_held() {
    let fuzzer = Fuzzer::start().await.expect("cluster starts");
    let served =
        cluster_tests::fuzz::served_during_idle_flood(&fuzzer.cluster, 1_000, 100, Duration::from_millis(1_000))
            .await
            .unwrap();
    assert!(served >= 0.99, "{served} of ordinary requests served in time");
}
