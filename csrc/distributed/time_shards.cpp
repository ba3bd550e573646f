#include "csrc/distributed/time_shards.h"

#include <torch/autograd.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <numeric>
#include <sstream>

namespace pnewton {

TimeShards::TimeShards(const std::string& group, bool reversed) : group_(group), reversed_(reversed) {
  const auto pg = c10d::resolve_process_group(group);
  count_ = pg->getSize();
  position_ = reversed ? count_ - 1 - pg->getRank() : pg->getRank();
}

namespace {

// What this process exchanged (benchmarks/bench_distributed.py): collectives, and the
// bytes of their results on this rank.
std::atomic<int64_t> collectives{0}, exchanged_bytes{0};
void record(int64_t bytes) {
  collectives += 1;
  exchanged_bytes += bytes;
}

// Every rank's x (same shape) in rank order, [P, ...].
at::Tensor all_gather(c10d::ProcessGroup& pg, const at::Tensor& x) {
  const at::Tensor in = x.contiguous();
  record(static_cast<int64_t>(in.nbytes()) * pg.getSize());
  std::vector<at::Tensor> inputs{in};
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int64_t r = 0; r < pg.getSize(); ++r) outputs[0].push_back(at::empty_like(in));
  pg.allgather(outputs, inputs)->wait();
  return at::stack(outputs[0]);
}

at::Tensor all_reduce(c10d::ProcessGroup& pg, const at::Tensor& x, c10d::ReduceOp::RedOpType op) {
  std::vector<at::Tensor> tensors{x.contiguous().clone()};
  record(static_cast<int64_t>(tensors[0].nbytes()));
  c10d::AllreduceOptions options;
  options.reduceOp = c10d::ReduceOp(op);
  pg.allreduce(tensors, options)->wait();
  return tensors[0];
}

// The gather with its adjoint: row q of the result is rank q's x, so the cotangent of this
// rank's x is the sum over ranks of their cotangents of its row (one all-reduce). It keeps
// the group's name, not the TimeShards: a backward may run after the solve has returned.
class GatherFunction : public torch::autograd::Function<GatherFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, std::string group,
                            bool reversed) {
    const auto pg = c10d::resolve_process_group(group);
    ctx->saved_data["group"] = group;
    ctx->saved_data["reversed"] = reversed;
    at::Tensor rows = all_gather(*pg, x);
    return reversed ? rows.flip(0) : rows;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto pg = c10d::resolve_process_group(ctx->saved_data["group"].toStringRef());
    const bool reversed = ctx->saved_data["reversed"].toBool();
    const at::Tensor total = all_reduce(*pg, grads[0], c10d::ReduceOp::SUM);
    const int64_t position = reversed ? pg->getSize() - 1 - pg->getRank() : pg->getRank();
    return {total.select(0, position), at::Tensor(), at::Tensor()};
  }
};

// x, with `rows` (a gather's result) made part of its graph: the gather's backward is a
// collective, so it must run on every rank whether or not this rank reads the rows.
class TieFunction : public torch::autograd::Function<TieFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& rows) {
    ctx->saved_data["rows"] = rows.sizes().vec();
    ctx->saved_data["options"] = rows.scalar_type();
    return x.view_as(x);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto sizes = ctx->saved_data["rows"].toIntVector();
    const auto type = ctx->saved_data["options"].toScalarType();
    return {grads[0], at::zeros(sizes, grads[0].options().dtype(type))};
  }
};

}  // namespace

at::Tensor tie(const at::Tensor& x, const at::Tensor& rows) {
  return rows.requires_grad() ? TieFunction::apply(x, rows) : x;
}

std::string failed_checks(const std::function<void()>& checks) {
  try {
    checks();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  }
  return {};
}

std::vector<int64_t> TimeShards::agree(const char* op, const std::vector<int64_t>& descriptor, size_t time_index,
                                       const at::Tensor& like, const std::string& local_error) {
  // The descriptor's own length first: ranks calling with different ranks of tensors differ
  // there. The last entry: whether this rank's checks failed.
  constexpr int64_t kMax = 24;
  const auto pg = c10d::resolve_process_group(group_);
  const bool nccl = pg->getBackendType() == c10d::ProcessGroup::BackendType::NCCL;
  std::string error = local_error;
  if (error.empty() && nccl && !like.is_cuda()) {
    error = c10::str(op, ": group '", group_, "' is an NCCL group, which moves CUDA tensors only; got tensors on ",
                     like.device(), " (use a gloo group for CPU tensors)");
  }
  if (error.empty() && static_cast<int64_t>(descriptor.size()) >= kMax - 1) error = c10::str(op, ": too many sizes to agree on");
  at::Tensor mine = at::full({kMax}, -1, at::kLong);
  if (error.empty()) {
    mine[0] = static_cast<int64_t>(descriptor.size());
    for (size_t i = 0; i < descriptor.size(); ++i) mine[i + 1] = descriptor[i];
  }
  mine[kMax - 1] = !error.empty();
  // NCCL moves CUDA tensors only: the current device's where this rank's are elsewhere.
  const at::Device device = nccl && !like.is_cuda() ? at::Device(at::kCUDA) : like.device();
  at::Tensor gathered = all_gather(*pg, mine.to(device)).cpu();
  // A rank whose checks failed: every rank raises its error (the lowest such rank's).
  for (int64_t rank = 0; rank < count_; ++rank) {
    if (gathered[rank][kMax - 1].item<int64_t>() == 0) continue;
    constexpr int64_t kMessage = 4096;
    at::Tensor text = at::zeros({kMessage}, at::kByte);
    std::memcpy(text.data_ptr(), error.data(), std::min<size_t>(error.size(), kMessage - 1));
    const at::Tensor texts = all_gather(*pg, text.to(device)).cpu();
    const std::string message(reinterpret_cast<const char*>(texts[rank].data_ptr()));
    TORCH_CHECK(false, message, " [the arguments of rank ", rank, " of group '", group_,
                "': every rank of the group raises this error]");
  }
  if (reversed_) gathered = gathered.flip(0).contiguous();
  const auto all = gathered.accessor<int64_t, 2>();
  lengths_.assign(count_, 0);
  bool same = true;
  for (int64_t q = 0; q < count_; ++q) {
    for (int64_t i = 0; i < kMax; ++i) {
      if (i != static_cast<int64_t>(time_index) + 1 && all[q][i] != all[0][i]) same = false;
    }
    lengths_[q] = all[q][time_index + 1];
  }
  if (!same) {
    std::ostringstream ranks;
    for (int64_t q = 0; q < count_; ++q) {
      ranks << (q ? "; " : "") << "rank " << rank_of(q) << ": [";
      for (int64_t i = 1; i <= all[q][0]; ++i) ranks << (i > 1 ? ", " : "") << all[q][i];
      ranks << "]";
    }
    TORCH_CHECK(false, op, ": the shards of group '", group_, "' disagree: every rank must pass the same sizes, ",
                "dtype and options but the length of its own time shard (size ", time_index, "); got ", ranks.str());
  }
  return lengths_;
}

int64_t TimeShards::offset() const {
  return std::accumulate(lengths_.begin(), lengths_.begin() + position_, int64_t(0));
}

int64_t TimeShards::total() const { return std::accumulate(lengths_.begin(), lengths_.end(), int64_t(0)); }

at::Tensor TimeShards::gather(const at::Tensor& x) const {
  return GatherFunction::apply(x, group_, reversed_);
}

at::Tensor TimeShards::neighbour(const at::Tensor& x, const at::Tensor& otherwise, bool earlier) const {
  const at::Tensor rows = gather(x);
  int64_t from = -1;
  if (earlier) {
    for (int64_t q = position_ - 1; q >= 0 && from < 0; --q) if (lengths_[q] > 0) from = q;
  } else {
    for (int64_t q = position_ + 1; q < count_ && from < 0; ++q) if (lengths_[q] > 0) from = q;
  }
  return from < 0 ? otherwise : rows.select(0, from);
}

TimeShards TimeShards::flipped() const {
  TimeShards other = *this;
  other.reversed_ = !reversed_;
  other.position_ = count_ - 1 - position_;
  other.lengths_.assign(lengths_.rbegin(), lengths_.rend());
  return other;
}

at::Tensor TimeShards::from_last(const at::Tensor& x) const {
  const at::Tensor rows = gather(x);
  int64_t last = count_ - 1;
  while (last > 0 && lengths_[last] == 0) --last;
  return rows.select(0, last);
}

at::Tensor shift_in_time(const at::Tensor& x, bool next, double fill, const TimeShards* shards) {
  const int64_t T = x.size(1);
  std::vector<int64_t> one(x.sizes().begin(), x.sizes().end());
  one[1] = 1;
  const at::Tensor none = at::full(one, fill, x.options());
  if (T == 0) {
    if (shards) shards->neighbour(none, none, !next);  // an empty shard takes part in the gather
    return x;
  }
  const at::Tensor edge = x.narrow(1, next ? 0 : T - 1, 1);  // what this shard hands on
  const at::Tensor beyond = shards ? shards->neighbour(edge, none, /*earlier=*/!next) : none;
  return next ? at::cat({x.narrow(1, 1, T - 1), beyond}, 1) : at::cat({beyond, x.narrow(1, 0, T - 1)}, 1);
}

at::Tensor TimeShards::max(const at::Tensor& x) const {
  // Backends' max drops NaN: a NaN anywhere is carried as a flag beside the values.
  const at::Tensor nan = x.isnan();
  const at::Tensor packed = at::stack({x.masked_fill(nan, -INFINITY), nan.to(x.scalar_type())});
  const at::Tensor reduced = all_reduce(*c10d::resolve_process_group(group_), packed, c10d::ReduceOp::MAX);
  return reduced[0].masked_fill(reduced[1] > 0, NAN);
}

at::Tensor TimeShards::sum(const at::Tensor& x) const { return all_reduce(*c10d::resolve_process_group(group_), x, c10d::ReduceOp::SUM); }

at::Tensor TimeShards::broadcast(const at::Tensor& x, int64_t from) const {
  std::vector<at::Tensor> tensors{x.contiguous().clone()};
  record(static_cast<int64_t>(tensors[0].nbytes()));
  c10d::BroadcastOptions options;
  options.rootRank = rank_of(from);
  c10d::resolve_process_group(group_)->broadcast(tensors, options)->wait();
  return tensors[0];
}

namespace {

std::vector<int64_t> shard_traffic(bool reset) {
  std::vector<int64_t> counts{collectives.load(), exchanged_bytes.load()};
  if (reset) collectives = 0, exchanged_bytes = 0;
  return counts;
}

void shards_raise(c10::string_view group, c10::string_view op, c10::string_view message) {
  const std::string name(op);
  const std::string text = message.empty() ? name + ": an argument check failed" : std::string(message);
  TimeShards(std::string(group), false).agree(name.c_str(), {}, 0, at::empty({0}), text);  // raises
}

}  // namespace

TORCH_LIBRARY_IMPL(pnewton, CatchAll, m) {
  m.impl("shard_traffic", &shard_traffic);
  m.impl("shards_raise", &shards_raise);
}

}  // namespace pnewton
