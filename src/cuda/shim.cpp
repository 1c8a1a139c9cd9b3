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
// cannot use the legacy default stream) and is recorded, not run. The device is synchronized first so
// the capture starts after all work already issued.
int ddpm_graph_capture_begin(ddpm_graph* graph, char** error) {
    return guarded(error, [&] {
        c10::cuda::set_device(graph->device);
        c10::cuda::device_synchronize();
        graph->enter();
        try {
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

}  // extern "C"
