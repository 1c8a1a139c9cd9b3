//! SubmitJob and GetJob latencies against a running server (`ddpm-bench submit`, `large-submit`).

use std::time::Instant;

use ddpm_worker::api::pb;

/// SubmitJob latency under concurrent clients (`ddpm-bench submit`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SubmitTiming {
    pub clients: usize,
    pub requests: usize,
    pub errors: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub requests_per_second: f64,
}

/// `clients` concurrent connections each submit `per_client` one-sample jobs of `model` back to back.
pub async fn time_submits(
    server: &str,
    model: &str,
    clients: usize,
    per_client: usize,
) -> Result<SubmitTiming, tonic::transport::Error> {
    let mut handles = Vec::with_capacity(clients);
    let started = Instant::now();
    for c in 0..clients {
        let mut client = pb::worker_service_client::WorkerServiceClient::connect(server.to_string()).await?;
        let model = model.to_string();
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_client);
            let mut errors = 0;
            for i in 0..per_client {
                let req = pb::SubmitJobRequest {
                    request_id: format!("bench-{}-{c}-{i}", std::process::id()),
                    spec: Some(pb::JobSpec {
                        model: model.clone(),
                        sampling: Some(pb::SamplingSpec {
                            scheduler: pb::Scheduler::Ddim as i32,
                            steps: 1,
                            eta: None,
                        }),
                        num_samples: 1,
                        ..Default::default()
                    }),
                };
                let t = Instant::now();
                match client.submit_job(req).await {
                    Ok(_) => latencies.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for h in handles {
        if let Ok((l, e)) = h.await {
            all.extend(l);
            errors += e;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| all.get(((all.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    Ok(SubmitTiming {
        clients,
        requests: all.len(),
        errors,
        p50_ms: pct(0.5),
        p90_ms: pct(0.9),
        p99_ms: pct(0.99),
        max_ms: all.last().copied().unwrap_or(f64::NAN),
        requests_per_second: all.len() as f64 / elapsed.max(1e-9),
    })
}

/// One large submission and the latency of other clients' GetJob calls while it is queued (`ddpm-bench
/// large-submit`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LargeSubmitTiming {
    pub job_id: String,
    pub num_samples: u64,
    pub shards_total: u32,
    pub submit_ms: f64,
    /// GetJob calls of a small job made back to back by another connection during the submission.
    pub get_job_calls: usize,
    pub get_job_p50_ms: f64,
    pub get_job_max_ms: f64,
}

/// Submits a small job, then a job of `num_samples` one-sample batches while another connection calls
/// GetJob on the small job in a loop; reports both latencies.
pub async fn time_large_submit(
    server: &str,
    model: &str,
    num_samples: u64,
    steps: u32,
) -> Result<LargeSubmitTiming, Box<dyn std::error::Error + Send + Sync>> {
    let request = |num_samples: u64| pb::SubmitJobRequest {
        request_id: String::new(),
        spec: Some(pb::JobSpec {
            model: model.to_string(),
            sampling: Some(pb::SamplingSpec { scheduler: pb::Scheduler::Ddim as i32, steps, eta: None }),
            num_samples,
            batch_size: 1,
            ..Default::default()
        }),
    };
    let mut client = pb::worker_service_client::WorkerServiceClient::connect(server.to_string()).await?;
    let small = client.submit_job(request(1)).await?.into_inner().job.unwrap_or_default().job_id;
    let mut reader = pb::worker_service_client::WorkerServiceClient::connect(server.to_string()).await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let polling = {
        let stop = std::sync::Arc::clone(&stop);
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                if reader.get_job(pb::GetJobRequest { job_id: small.clone() }).await.is_ok() {
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            latencies
        })
    };
    // Let the reader get going first, so that its calls overlap the whole submission.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let started = Instant::now();
    let job = client.submit_job(request(num_samples)).await?.into_inner().job.unwrap_or_default();
    let submit_ms = started.elapsed().as_secs_f64() * 1e3;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut latencies = polling.await?;
    latencies.sort_by(f64::total_cmp);
    Ok(LargeSubmitTiming {
        job_id: job.job_id,
        num_samples,
        shards_total: job.shards_total,
        submit_ms,
        get_job_calls: latencies.len(),
        get_job_p50_ms: latencies.get(latencies.len() / 2).copied().unwrap_or(f64::NAN),
        get_job_max_ms: latencies.last().copied().unwrap_or(f64::NAN),
    })
}
