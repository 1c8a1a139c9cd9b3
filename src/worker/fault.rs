//! Faults the tests inject into a real `serve` (only with the `test-support` feature; the release
//! binary has none): `DDPM_TEST_FAULT=point[,point…]`.
//! - `warmup-panic`: a device thread panics while warming its models.
//! - `device-lost`: every batch fails as a poisoned CUDA context fails, and so does the device probe.

/// Whether the fault `point` is injected into this process.
#[cfg(feature = "test-support")]
pub fn injected(point: &str) -> bool {
    std::env::var("DDPM_TEST_FAULT").is_ok_and(|v| v.split(',').any(|p| p == point))
}

#[cfg(not(feature = "test-support"))]
pub fn injected(_point: &str) -> bool {
    false
}
