//! ddpm-worker: batch image generation with diffusers DDPM-family models on libtorch.
//!
//! The sampling core ([`model`], [`schedulers`], [`rng`], [`sampler`]) reproduces diffusers' pipelines to
//! the last pixel; [`generate`] runs it locally, writing PNGs, a grid and a manifest.

pub mod api;
pub mod classes;
pub mod client;
pub mod console;
pub mod cuda;
pub mod dataset;
pub mod digest;
pub mod events;
pub mod generate;
pub mod imaging;
pub mod init_model;
pub mod job;
pub mod model;
pub mod models;
pub mod placement;
pub mod queue;
pub mod rng;
pub mod sampler;
pub mod schedulers;
pub mod service;
pub mod storage;
pub mod telemetry;
pub mod validation;
pub mod verify;
pub mod worker;
