//! The peer comparison (`scripts/compare`, binary `ewii-compare`): Ewii against the tunnels a
//! customer would pick instead, in one run on one machine, interleaved, several repetitions,
//! reported as medians, ranges and ratios (never asserted).

pub mod load;
pub mod procs;
pub mod report;
pub mod systems;
