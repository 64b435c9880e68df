//! Running a target at volume: a few workers, each drawing inputs from its own seeded
//! RNG, until the case count or the time bound; crashes keep their input.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{generate::Rng, Fuzzer, Target, Verdict, Worker};

#[derive(Debug, Clone)]
pub struct Crash {
    pub target: Target,
    pub input: Vec<u8>,
    pub what: String,
}

#[derive(Debug, Clone)]
pub struct TargetReport {
    pub target: Target,
    pub cases: u64,
    pub accepted: u64,
    pub refused: u64,
    /// Every crash counted; the first `CRASHES_KEPT` are in `crashes` with their inputs.
    pub crashed: u64,
    pub crashes: Vec<Crash>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub cases: u64,
    pub time: Duration,
    pub workers: usize,
    pub seed: u64,
}

/// Crashes kept per target (their inputs are saved); later ones are only counted.
const CRASHES_KEPT: usize = 20;

pub async fn run_target(fuzzer: Arc<Fuzzer>, target: Target, budget: Budget) -> TargetReport {
    let started = Instant::now();
    let deadline = started + budget.time;
    let crashes = Arc::new(Mutex::new(Vec::new()));
    let per_worker = budget.cases.div_ceil(budget.workers.max(1) as u64);
    let mut tasks = Vec::new();
    for index in 0..budget.workers.max(1) {
        let fuzzer = Arc::clone(&fuzzer);
        let crashes = Arc::clone(&crashes);
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(budget.seed ^ (index as u64).wrapping_mul(0x9e37_79b9) ^ target as u64);
            let mut worker = Worker::new(index);
            let (mut cases, mut accepted, mut refused, mut crashed) = (0u64, 0u64, 0u64, 0u64);
            while cases < per_worker && Instant::now() < deadline {
                let input = rng.bytes();
                cases += 1;
                match fuzzer.run_case(target, &input, &mut worker).await {
                    Ok(Verdict::Accepted) => accepted += 1,
                    Ok(Verdict::Refused) => refused += 1,
                    Err(what) => {
                        crashed += 1;
                        let mut kept = crashes.lock().expect("not poisoned");
                        if kept.len() < CRASHES_KEPT {
                            kept.push(Crash { target, input, what });
                        }
                    }
                }
            }
            (cases, accepted, refused, crashed)
        }));
    }
    let (mut cases, mut accepted, mut refused, mut crashed) = (0, 0, 0, 0);
    for task in tasks {
        let (c, a, r, x) = task.await.expect("fuzz worker does not panic");
        cases += c;
        accepted += a;
        refused += r;
        crashed += x;
    }
    let mut crashes = std::mem::take(&mut *crashes.lock().expect("not poisoned"));
    // The HTTP/2 target's property is the server's: it must still answer afterwards.
    if target == Target::WireHttp2 {
        if let Err(what) = fuzzer.still_serving().await {
            crashed += 1;
            crashes.push(Crash { target, input: Vec::new(), what });
        }
    }
    TargetReport { target, cases, accepted, refused, crashed, crashes, seconds: started.elapsed().as_secs_f64() }
}
