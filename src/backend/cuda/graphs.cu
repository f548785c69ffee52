// run_recorded: a forward pass of a few tokens (decode steps, the seed's micro-batches of 16) is
// hundreds of small kernels whose launches cost the host more than the GPU spends running them.
// The second time a key comes, the body is captured into a CUDA graph; from the third on, the
// body only stages its inputs (token ids, positions, row lists) into fixed pinned slots, whose
// copies to the device are the graph's first nodes, and the graph is launched once.
#include "backend/cuda/cuda_backend_impl.cuh"

namespace kestrel::backend::cuda {

void CudaBackend::drop_graphs() {
  for (auto& [key, g] : graphs_)
    if (g.exec) cudaGraphExecDestroy(g.exec);
  graphs_.clear();
}

Status CudaBackend::run_recorded(uint64_t key, const std::function<Status()>& body) {
  // A recorded pass must make the same choices (which activations to re-quantize) every time.
  forget_activations();
  if (mode_ != Mode::Eager || graphs_disabled_) return body();  // nested, or switched off
  if (drop_graphs_pending_) {
    drop_graphs();
    drop_graphs_pending_ = false;
  }
  Recorded& g = graphs_[key];
  if (g.failed || g.runs++ == 0) return body();  // the first run allocates what the body needs
  // The pinned slots are refilled below: the previous launch must have read them.
  CUDA_TRY(cudaStreamSynchronize(stream_), "graph (wait for the previous step)");
  if (!g.exec) {
    mode_ = Mode::Capture;
    graph_slot_ = 0;
    upload_index_ = 0;
    recording_ = &g;
    g.reused.clear();
    Status st = cuda_status(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal),
                            "graph capture");
    if (st) st = body();
    cudaGraph_t graph = nullptr;
    const cudaError_t end = cudaStreamEndCapture(stream_, &graph);
    mode_ = Mode::Eager;
    cudaError_t inst = cudaErrorUnknown;
    if (st && end == cudaSuccess) inst = cudaGraphInstantiate(&g.exec, graph, 0);
    if (graph) cudaGraphDestroy(graph);
    if (!st || end != cudaSuccess || inst != cudaSuccess) {
      // Not recordable (an op needs host-side sizes, or the driver refused): run it eagerly
      // from now on. The inputs of this call were not run yet.
      cudaGetLastError();
      if (g.exec) cudaGraphExecDestroy(g.exec);
      g.exec = nullptr;
      g.failed = true;
      return body();
    }
  } else {
    mode_ = Mode::Stage;
    graph_slot_ = 0;
    upload_index_ = 0;
    recording_ = &g;
    stage_diverged_ = false;
    Status st = body();
    mode_ = Mode::Eager;
    KESTREL_TRY(st);
    if (stage_diverged_ || upload_index_ != g.reused.size()) {
      // The body's inputs repeat differently than when it was captured (an array reused with
      // other contents): nothing was launched yet; run this key eagerly from now on.
      cudaGraphExecDestroy(g.exec);
      g.exec = nullptr;
      g.failed = true;
      return body();
    }
  }
  return cuda_status(cudaGraphLaunch(g.exec, stream_), "graph launch");
}

}  // namespace kestrel::backend::cuda
