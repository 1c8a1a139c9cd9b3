//! UNet calls replayed from a graph captured per batch shape (CUDA graphs), with the bookkeeping every
//! graph needs: inputs copied into static buffers, the timestep as a device tensor filled before each
//! replay, and the output copied out (schedulers keep earlier outputs, and the next replay overwrites
//! the buffer). The same bookkeeping runs on any device with [`GraphMode::Emulated`], which replays by
//! calling the network on the static buffers, so it is tested where no GPU is.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tch::{Device, Tensor};

use super::{LoadedUNet, ModelError};
use crate::cuda::{CudaError, CudaGraph};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphMode {
    /// CUDA graphs (the device must be CUDA).
    Cuda,
    /// Static buffers and replays without a graph.
    Emulated,
}

/// Eager calls made before a capture: cuDNN's autotuner (`cudnn.benchmark`) and the caching allocator
/// settle there, not inside the graph.
const WARMUP_CALLS: usize = 2;

enum Replayer {
    Cuda(CudaGraph),
    Emulated,
}

struct Captured {
    replayer: Replayer,
    input: Tensor,
    timestep: Tensor,
    /// The class labels' static buffer, for a call with labels.
    classes: Option<Tensor>,
    output: Tensor,
}

/// The graphs of one UNet replica, by input shape.
pub struct GraphCache {
    mode: GraphMode,
    by_shape: BTreeMap<Vec<i64>, Captured>,
    /// Graphs captured so far (one per batch shape).
    pub captures: usize,
    pub replays: u64,
}

impl GraphCache {
    pub fn new(mode: GraphMode) -> Self {
        Self { mode, by_shape: BTreeMap::new(), captures: 0, replays: 0 }
    }
}

/// One lock per CUDA device, held while a replica runs a batch shape for the first time (its eager
/// warm-up calls and its capture): cuDNN's autotuner tries algorithms with workspaces as large as the
/// free memory, which runs a second thread on the same GPU out of memory, and a capture is safest with
/// no other first calls beside it. Threads sharing a GPU thus take their first steps of a shape one at a
/// time (the autotuner's choices are cached per process, so the second is quick); later calls do not lock.
static FIRST_CALLS: [Mutex<()>; 16] = [const { Mutex::new(()) }; 16];

/// The lock of [`FIRST_CALLS`] for `device`; none off CUDA.
pub fn first_call_lock(device: Device) -> Option<MutexGuard<'static, ()>> {
    match device {
        Device::Cuda(i) => {
            Some(FIRST_CALLS[i % FIRST_CALLS.len()].lock().unwrap_or_else(PoisonError::into_inner))
        }
        _ => None,
    }
}

/// A copy of `t` in new memory, with its layout.
fn copied(t: &Tensor) -> Result<Tensor, tch::TchError> {
    let mut out = t.f_empty_like()?;
    out.f_copy_(t)?;
    Ok(out)
}

impl From<CudaError> for ModelError {
    fn from(e: CudaError) -> Self {
        ModelError::Unsupported(e.to_string())
    }
}

impl LoadedUNet {
    /// Captures one graph per batch shape on first use, replaying it afterwards; an eager call when
    /// graphs are off. `classes`: the batch's class labels, for a class-conditional network.
    pub fn denoise(
        &self,
        sample: &Tensor,
        timestep: i64,
        classes: Option<&Tensor>,
    ) -> Result<Tensor, ModelError> {
        let mut key = sample.size();
        // Calls with labels and without are different graphs (a marker no shape has: a negative size).
        if let Some(c) = classes {
            key.push(-1);
            key.extend(c.size());
        }
        let Some(cache) = &self.graphs else {
            let _first = match self.eager_shapes.borrow_mut().insert(key) {
                true => first_call_lock(sample.device()),
                false => None,
            };
            return Ok(self.forward_classes(sample, timestep, classes));
        };
        let mut cache = cache.borrow_mut();
        if !cache.by_shape.contains_key(&key) {
            let _first = first_call_lock(sample.device());
            let captured = self.capture(sample, timestep, classes, cache.mode)?;
            cache.by_shape.insert(key.clone(), captured);
            cache.captures += 1;
        }
        let Some(c) = cache.by_shape.get_mut(&key) else {
            return Err(ModelError::Config("a graph was captured for this shape. This is a bug.".into()));
        };
        c.input.f_copy_(sample)?;
        let _ = c.timestep.f_fill_(timestep)?;
        if let (Some(buffer), Some(labels)) = (&mut c.classes, classes) {
            buffer.f_copy_(labels)?;
        }
        match &mut c.replayer {
            Replayer::Cuda(graph) => graph.replay()?,
            Replayer::Emulated => {
                c.output.f_copy_(&self.forward_t(&c.input, &c.timestep, c.classes.as_ref()))?
            }
        }
        let out = copied(&c.output)?;
        cache.replays += 1;
        Ok(out)
    }

    fn capture(
        &self,
        sample: &Tensor,
        timestep: i64,
        classes: Option<&Tensor>,
        mode: GraphMode,
    ) -> Result<Captured, ModelError> {
        let device = sample.device();
        let input = copied(sample)?;
        let timestep = Tensor::f_from_slice(&[timestep])?.f_to_device(device)?;
        let classes = classes.map(copied).transpose()?;
        for _ in 0..WARMUP_CALLS {
            let _ = self.forward_t(&input, &timestep, classes.as_ref());
        }
        let (replayer, output) = match (mode, device) {
            (GraphMode::Cuda, Device::Cuda(i)) => {
                let mut graph = CudaGraph::new(i)?;
                let output = graph.capture(|| self.forward_t(&input, &timestep, classes.as_ref()))?;
                (Replayer::Cuda(graph), output)
            }
            (GraphMode::Cuda, _) => {
                return Err(ModelError::Unsupported("CUDA graphs need a CUDA device".into()));
            }
            (GraphMode::Emulated, _) => {
                (Replayer::Emulated, self.forward_t(&input, &timestep, classes.as_ref()))
            }
        };
        Ok(Captured { replayer, input, timestep, classes, output })
    }

    /// Turns graph replay on (`Some`) or off; captured graphs are dropped either way.
    pub fn set_graphs(&mut self, mode: Option<GraphMode>) {
        self.graphs = mode.map(|m| std::cell::RefCell::new(GraphCache::new(m)));
    }

    /// Graphs captured and replays made so far.
    pub fn graph_counts(&self) -> Option<(usize, u64)> {
        self.graphs.as_ref().map(|c| {
            let c = c.borrow();
            (c.captures, c.replays)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init_model::Preset;

    fn tiny() -> LoadedUNet {
        LoadedUNet::random(Preset::Tiny.unet_config(), 3).unwrap()
    }

    /// Replays give the eager call's values bit for bit, one capture per batch shape, whatever the
    /// caller does with its tensors afterwards.
    #[test]
    fn emulated_replays_match_eager_calls_and_capture_once_per_shape() {
        let _guard = tch::no_grad_guard();
        let eager = tiny();
        let mut graphed = eager.replica();
        graphed.set_graphs(Some(GraphMode::Emulated));
        let (h, w) = eager.config.sample_hw().unwrap();
        let c = eager.config.in_channels;
        tch::manual_seed(0);
        let mut outputs = Vec::new();
        for (batch, t) in [(2, 999), (2, 500), (3, 10), (2, 0)] {
            let mut x = Tensor::randn([batch, c, h, w], (tch::Kind::Float, Device::Cpu));
            let want = eager.forward(&x, t);
            let got = graphed.denoise(&x, t, None).unwrap();
            assert!(got.equal(&want), "batch {batch}, t {t}");
            // The result is the caller's: neither a later input nor a later replay changes it.
            let kept = got.copy();
            let _ = x.fill_(7.0);
            outputs.push((got, kept));
        }
        for (got, kept) in &outputs {
            assert!(got.equal(kept));
        }
        assert_eq!(graphed.graph_counts(), Some((2, 4)));
        // A different timestep reached the static buffer: outputs at t=999 and t=500 differ.
        assert!(!outputs[0].0.equal(&outputs[1].0));
    }

    /// A class-conditional network's replays take each call's labels from their static buffer.
    #[test]
    fn replays_take_each_calls_class_labels() {
        let _guard = tch::no_grad_guard();
        let config = crate::model::UNet2DConfig { num_class_embeds: Some(5), ..Preset::Tiny.unet_config() };
        let eager = LoadedUNet::random(config, 4).unwrap();
        let mut graphed = eager.replica();
        graphed.set_graphs(Some(GraphMode::Emulated));
        let (h, w) = eager.config.sample_hw().unwrap();
        tch::manual_seed(1);
        let x = Tensor::randn([2, eager.config.in_channels, h, w], (tch::Kind::Float, Device::Cpu));
        let mut seen = Vec::new();
        for labels in [[0i64, 1], [4, 2], [0, 1]] {
            let labels = Tensor::from_slice(&labels);
            let want = eager.forward_classes(&x, 10, Some(&labels));
            let got = graphed.denoise(&x, 10, Some(&labels)).unwrap();
            assert!(got.equal(&want), "{labels:?}");
            seen.push(got);
        }
        assert!(!seen[0].equal(&seen[1]), "the labels change the output");
        assert!(seen[0].equal(&seen[2]));
        assert_eq!(graphed.graph_counts(), Some((1, 3)));
    }

    #[test]
    fn cuda_graphs_refuse_a_cpu_tensor() {
        let mut unet = tiny();
        unet.set_graphs(Some(GraphMode::Cuda));
        let (h, w) = unet.config.sample_hw().unwrap();
        let x = Tensor::zeros([1, unet.config.in_channels, h, w], (tch::Kind::Float, Device::Cpu));
        let err = unet.denoise(&x, 1, None).unwrap_err().to_string();
        assert!(err.contains("CUDA graphs need a CUDA device"), "{err}");
    }
}
