//! The batch worker: a job's samples split into shards that device threads sample independently.

pub mod planner;
