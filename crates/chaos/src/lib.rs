//! Load and fault tooling shared by the chaos suite and the benchmarks: the cluster as
//! child processes, and open- and closed-loop load generators.

#![forbid(unsafe_code)]

pub mod cluster;
pub mod load;
