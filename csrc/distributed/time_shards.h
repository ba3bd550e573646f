#pragma once
// A sequence whose time axis is split across the ranks of a torch.distributed process group
// (README "Long sequences across devices"): rank r holds the contiguous shard [B, T_r, ...].
// Everything the solver and the scans exchange goes through this class, on c10d collectives
// (gloo, NCCL, whatever backend the group has), in amounts that do not depend on T:
//   - agree: once per op call, every rank's shapes, checked alike on every rank;
//   - gather: the per-rank summaries of a scan and the halo states, [P, ...] in time order;
//   - reduce: the per-sequence residuals and steps of an iteration (NaN-propagating max).
// reversed: the shards in the opposite time order (rank P−1 holds the start), for the reverse
// direction of a bidirectional layer, whose every rank flips its own shard.
#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace pnewton {

class TimeShards {
 public:
  // group: the name of a registered process group (torch.distributed's group.group_name).
  TimeShards(const std::string& group, bool reversed);

  int64_t position() const { return position_; }  // this rank's place in time order
  int64_t count() const { return count_; }
  bool reversed() const { return reversed_; }
  const std::string& group() const { return group_; }

  // Exchanges `descriptor` (every rank must pass the same sizes but the time one, at index
  // time_index) and raises the same error on every rank where they differ. Returns each
  // rank's T in time order; remembers them for offset(), total() and the halo. `like`: a
  // tensor of the call, whose device the group's backend must be able to move (NCCL: CUDA).
  // local_error: what this rank's own argument checks raised (failed_checks), "" if none;
  // then every rank raises the first failing rank's error, in this same call (one more
  // gather, of the message), so that no rank's next collective pairs with another call's.
  std::vector<int64_t> agree(const char* op, const std::vector<int64_t>& descriptor, size_t time_index,
                             const at::Tensor& like, const std::string& local_error = {});
  int64_t length(int64_t position) const { return lengths_.at(position); }
  int64_t offset() const;  // the global index of this shard's first step
  int64_t total() const;   // the whole sequence's length

  // [P, ...x.shape]: every rank's x (same shape everywhere) in time order. Differentiable:
  // the backward adds every rank's cotangent of a row onto the rank that gave it.
  at::Tensor gather(const at::Tensor& x) const;
  // x from the nearest earlier (later, if !earlier) rank in time order whose shard is not
  // empty, or `otherwise` when there is none (one gather). Differentiable.
  at::Tensor neighbour(const at::Tensor& x, const at::Tensor& otherwise, bool earlier) const;
  // The same shards in the opposite time order (after agree: the lengths come along).
  TimeShards flipped() const;
  // x of the last non-empty shard in time order, on every rank (one gather). Differentiable.
  at::Tensor from_last(const at::Tensor& x) const;
  // Elementwise max over the ranks; a NaN anywhere gives NaN (one collective). Not differentiable.
  at::Tensor max(const at::Tensor& x) const;
  at::Tensor sum(const at::Tensor& x) const;
  // x as the rank at time position `from` has it, on every rank.
  at::Tensor broadcast(const at::Tensor& x, int64_t from) const;

 private:
  int64_t rank_of(int64_t position) const { return reversed_ ? count_ - 1 - position : position; }
  std::string group_;  // resolved at each collective: the registry owns the group
  bool reversed_;
  int64_t position_, count_;
  std::vector<int64_t> lengths_;
};

// Runs this rank's argument checks of a sharded call: the message of the error they raise,
// "" when they pass. Checks that can fail on one rank alone must run so, and their outcome
// go to TimeShards::agree, before any collective.
std::string failed_checks(const std::function<void()>& checks);

// x [B, T, ...] one step along time over the whole sequence: x_{t+1} (next) or x_{t−1},
// `fill` beyond either end; over time shards the neighbouring shard's first (last) step
// comes by one gather. shards may be null (one process).
at::Tensor shift_in_time(const at::Tensor& x, bool next, double fill, const TimeShards* shards);

// x, with the result `rows` of a differentiable gather in its graph (a no-op forwards): every
// rank then runs the gather's backward, a collective, whether or not it reads the rows.
at::Tensor tie(const at::Tensor& x, const at::Tensor& rows);

using SharedShards = std::shared_ptr<TimeShards>;

// A sharded scan (the scan ops' semantics over the whole sequence): a local scan from zero,
// one gather of every shard's composed transition and end state, the fold of the shards
// before this one (after it when reverse) and a local scan from the state that enters the
// shard. Built of differentiable pieces: autograd runs the transposed scans and one
// all-reduce. a [B, T, D] (diag) or [B, T, H, k, k] (block), b [B, T, D] / [B, T, H, k].
at::Tensor sharded_scan_diag(TimeShards& shards, const at::Tensor& a, const at::Tensor& b,
                             const std::optional<at::Tensor>& x0, bool reverse);
at::Tensor sharded_scan_block(TimeShards& shards, const at::Tensor& A, const at::Tensor& b,
                              const std::optional<at::Tensor>& x0, bool reverse, bool transpose);

}  // namespace pnewton
