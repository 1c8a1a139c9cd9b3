// CUDA graphs for the Rust side (tch exposes none): capture a thread's work on a side stream, replay it.
// Errors cross the C boundary as strings; nothing here throws into Rust.
//
// Only functions exported by libtorch_cuda and libc10_cuda are called (no CUDA runtime call is inlined
// here), so the binary needs no libcudart of its own: libtorch_cuda brings it.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include "common.h"

#include <optional>

struct ddpm_graph {
    at::cuda::CUDAGraph graph;
    c10::DeviceIndex device;
    c10::cuda::CUDAStream stream;
    // The thread's current device and its current stream there, restored when the capture ends.
    std::optional<std::pair<c10::DeviceIndex, c10::cuda::CUDAStream>> saved;

    explicit ddpm_graph(c10::DeviceIndex device)
        : device(device), stream(c10::cuda::getStreamFromPool(false, device)) {}

    void enter() {
        c10::DeviceIndex previous = c10::cuda::current_device();
        c10::cuda::set_device(device);
        saved.emplace(previous, c10::cuda::getCurrentCUDAStream(device));
        c10::cuda::setCurrentCUDAStream(stream);
    }

    void leave() {
        if (saved) {
            c10::cuda::setCurrentCUDAStream(saved->second);
            c10::cuda::set_device(saved->first);
            saved.reset();
        }
    }
};

extern "C" {

void ddpm_free_message(char* message) { std::free(message); }

ddpm_graph* ddpm_graph_new(int device, char** error) {
    ddpm_graph* graph = nullptr;
    guarded(error, [&] { graph = new ddpm_graph(static_cast<c10::DeviceIndex>(device)); });
    return graph;
}

// From here to ddpm_graph_capture_end, this thread's CUDA work goes to the graph's own stream (capture
// cannot use the legacy default stream) and is recorded, not run. The thread's own stream is
// synchronized first so the capture starts after the work it already issued; only that stream: a
// device-wide synchronize would wait on, and so invalidate, another thread's capture.
int ddpm_graph_capture_begin(ddpm_graph* graph, char** error) {
    return guarded(error, [&] {
        graph->enter();
        try {
            graph->saved->second.synchronize();
            // Thread-local capture: other threads sharing the GPU (lanes, device threads) keep making
            // calls that a global capture would forbid them (allocations, synchronous copies).
            graph->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
        } catch (...) {
            graph->leave();
            throw;
        }
    });
}

int ddpm_graph_capture_end(ddpm_graph* graph, char** error) {
    return guarded(error, [&] {
        try {
            graph->graph.capture_end();
        } catch (...) {
            graph->leave();
            throw;
        }
        graph->leave();
    });
}

// Replays on the thread's current stream, after the work already issued to it.
int ddpm_graph_replay(ddpm_graph* graph, char** error) {
    return guarded(error, [&] { graph->graph.replay(); });
}

void ddpm_graph_free(ddpm_graph* graph) { delete graph; }

// This thread's CUDA work on `device` goes to a stream of its own from now on (one of libtorch's pool,
// which do not synchronize with the legacy default stream), so that threads sharing a GPU (lanes,
// device threads) overlap instead of queueing behind each other on one stream. The thread's current
// device is left as it was. The stream the thread used until now (the legacy default stream, which every
// thread shares: models loaded by another thread were converted there) is synchronized first, so the
// new stream starts after that work.
int ddpm_use_own_stream(int device, char** error) {
    return guarded(error, [&] {
        auto index = static_cast<c10::DeviceIndex>(device);
        c10::cuda::getCurrentCUDAStream(index).synchronize();
        c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(false, index));
    });
}

// Waits for the work this thread issued on `device` (its current stream there), not for the whole
// device: a device-wide synchronize while another thread captures a graph would break that capture.
int ddpm_stream_synchronize(int device, char** error) {
    return guarded(error, [&] {
        c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).synchronize();
    });
}

}  // extern "C"
