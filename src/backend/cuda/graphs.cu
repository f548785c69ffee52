// run_recorded: a forward pass of a few tokens (decode steps, the seed's micro-batches of 16) is
// hundreds of small kernels whose launches cost the host more than the GPU spends running them.
// The second time a key comes, the body is captured into a CUDA graph; from the third on, the
// body only stages its inputs (token ids, positions, row lists) into fixed pinned slots, whose
// copies to the device are the graph's first nodes, and the graph is launched once.
#include <chrono>
#include <cstdio>
#include <cstring>

#include "backend/cuda/cuda_backend_impl.cuh"

namespace kestrel::backend::cuda {

namespace {

double us_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

Status CudaBackend::init_graph_timing() {
  graph_timing_ = std::make_unique<GraphTiming>();
  for (int i = 0; i < 2; ++i) {
    CUDA_TRY(cudaEventCreate(&graph_timing_->start[i]), "cudaEventCreate");
    CUDA_TRY(cudaEventCreate(&graph_timing_->stop[i]), "cudaEventCreate");
  }
  return Status::ok();
}

void CudaBackend::GraphTiming::read() {
  if (!pending) return;
  float ms = 0;
  if (cudaEventElapsedTime(&ms, start[cur], stop[cur]) == cudaSuccess) {
    gpu_us += 1e3 * ms;
    ++replays;
  }
  if (follows[cur] && cudaEventElapsedTime(&ms, stop[1 - cur], start[cur]) == cudaSuccess) {
    between_us += 1e3 * ms;  // the copies outside the graphs (logits) and the host's gap
    ++betweens;
  }
  pending = false;
  cur ^= 1;
}

CudaBackend::GraphTiming::~GraphTiming() {
  if (replays > 0)
    std::fprintf(stderr,
                 "graph timing (KESTREL_CUDA_GRAPH_TIMING=1): %.0f replays; GPU %.1f us a replay "
                 "inside the graph, %.1f us from a replay's end to the next one's start; host "
                 "%.1f us waiting for the GPU before staging, %.1f us staging, %.1f us in "
                 "cudaGraphLaunch a replay\n",
                 replays, gpu_us / replays, betweens > 0 ? between_us / betweens : 0.0,
                 wait_us / replays, stage_us / replays, launch_us / replays);
  for (int i = 0; i < 2; ++i) {
    if (start[i]) cudaEventDestroy(start[i]);
    if (stop[i]) cudaEventDestroy(stop[i]);
  }
}

void CudaBackend::drop_graphs() {
  for (auto& [key, g] : graphs_)
    if (g.exec) cudaGraphExecDestroy(g.exec);
  graphs_.clear();
}

// A replay's inputs straight into the slots its capture filled from them (Recorded::fills).
bool CudaBackend::Recorded::stage_direct(const RecordInput* inputs, int n_inputs,
                                         int32_t* slots_host) const {
  if (!direct || static_cast<size_t>(n_inputs) != input_sizes.size()) return false;
  for (int i = 0; i < n_inputs; ++i)
    if (inputs[i].n != input_sizes[i]) return false;
  for (const RecordFill& f : fills)
    std::memcpy(slots_host + f.at, inputs[f.input].data + f.offset, f.n * sizeof(int32_t));
  return true;
}

Status CudaBackend::run_recorded(uint64_t key, const RecordInput* inputs, int n_inputs,
                                 const std::function<Status()>& body) {
  // A recorded pass must make the same choices (which activations to re-quantize) every time.
  forget_activations();
  if (mode_ != Mode::Eager || graphs_disabled_) return body();  // nested, or switched off
  if (drop_graphs_pending_) {
    drop_graphs();
    drop_graphs_pending_ = false;
  }
  Recorded& g = graphs_[key];
  GraphTiming* gt = graph_timing_.get();
  if (gt && !g.exec) gt->interrupted = true;  // (no replay: its time is not a gap)
  if (g.failed) return body();
  if (g.runs++ == 0) {  // the first run allocates what the body needs
    eager_uploads_ = 0;
    const Status st = body();
    g.first_uploads = eager_uploads_;
    eager_uploads_ = -1;
    return st;
  }
  // The pinned slots are refilled below: the previous launch must have read them.
  auto t0 = std::chrono::steady_clock::now();
  CUDA_TRY(cudaStreamSynchronize(stream_), "graph (wait for the previous step)");
  if (gt) {
    if (g.exec) gt->wait_us += us_since(t0);
    gt->read();
    t0 = std::chrono::steady_clock::now();
  }
  bool timed = false;
  const bool replay = g.exec != nullptr;
  if (!replay) {
    mode_ = Mode::Capture;
    graph_slot_ = 0;
    upload_index_ = 0;
    recording_ = &g;
    g.reused.clear();
    g.fills.clear();
    g.input_sizes.clear();
    for (int i = 0; i < n_inputs; ++i) g.input_sizes.push_back(inputs[i].n);
    g.direct = graph_direct_stage_;
    capture_inputs_ = inputs;
    n_capture_inputs_ = n_inputs;
    Status st = cuda_status(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal),
                            "graph capture");
    copied_slots_ = 0;
    if (st && graph_one_copy_ && g.first_uploads > 0 && g.first_uploads <= kGraphSlots) {
      copied_slots_ = g.first_uploads;
      st = cuda_status(
          cudaMemcpyAsync(slots_dev_, slots_host_, sizeof(int32_t) * kSlotInts * copied_slots_,
                          cudaMemcpyHostToDevice, stream_),
          "index upload");
    }
    if (st) st = body();
    copied_slots_ = 0;
    capture_inputs_ = nullptr;
    n_capture_inputs_ = 0;
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
  } else if (!g.stage_direct(inputs, n_inputs, slots_host_)) {
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
      if (gt) gt->interrupted = true;
      return body();
    }
  }
  if (gt && replay) {
    gt->stage_us += us_since(t0);
    CUDA_TRY(cudaEventRecord(gt->start[gt->cur], stream_), "graph timing");
    gt->follows[gt->cur] = gt->recorded && !gt->interrupted;
    timed = true;
    t0 = std::chrono::steady_clock::now();
  }
  KESTREL_TRY(cuda_status(cudaGraphLaunch(g.exec, stream_), "graph launch"));
  if (timed) {
    gt->launch_us += us_since(t0);
    CUDA_TRY(cudaEventRecord(gt->stop[gt->cur], stream_), "graph timing");
    gt->pending = gt->recorded = true;
    gt->interrupted = false;
  }
  return Status::ok();
}

}  // namespace kestrel::backend::cuda
