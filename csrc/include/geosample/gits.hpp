// GITS: the cost matrix of a teacher trajectory and the dynamic programme over a fine grid of
// n points (indices 0 .. n-1).
//
//   V[i][1] = C[i][n-1],   V[j][k] = min_{j < m < n-1} C[j][m] + gamma V[m][k-1],
//
// with argmin back-pointers (ties: the smallest m). The path for `steps` steps starts at 0,
// follows the pointers and ends at n-1: steps + 1 strictly increasing indices. Costs with
// |C| >= 2^512 are first divided by a power of two (exact; the argmin is scale-invariant), so the
// sums do not overflow; if they still do (gamma^k near the double range) the smallest m is taken.
#pragma once

#include <string>
#include <vector>

namespace geosample {
namespace gits {

// cost: row-major n x n (only C[j][m] with j < m is read). Requires n >= 2, 1 <= steps <= n-1,
// finite gamma > 0 and finite costs; throws std::invalid_argument otherwise.
std::vector<int> solve_dp(const double* cost, int n, int steps, double gamma);

// The paths for every step count 1 .. max_steps from one DP table (result[k - 1] has k + 1 indices).
std::vector<std::vector<int>> solve_dp_all(const double* cost, int n, int max_steps, double gamma);

// How an Euler jump x_hat_ij = x[i] + (grid[j] - grid[i]) d_i, d_i = (x[i] - den[i]) / grid[i], is
// scored against the teacher point x[j], per sample (then averaged over the batch):
//   l1:  |x_hat_ij - x[j]|_1          l2:  |x_hat_ij - x[j]|_2
//   dev: |P (x[T-1] - x_hat_ij)| - |P (x[T-1] - x[j])|,  P = I - u u^T,  u || x[T-1] - x[0]
enum class Metric { l1, l2, dev };
Metric metric_from_name(const std::string& name);  // "l1" | "l2" | "dev"; throws std::invalid_argument

// The batch-mean cost of every jump i -> j of a teacher trajectory (geosample/gits/cost.py).
// x: T x B x D row-major (the teacher's points), den: (T-1) x B x D with den[t] = D(x[t], grid[t]),
// grid: T sigmas > 0.  out: T x T row-major, out[i][j] for i < j and +inf elsewhere.
// l1 and l2 form each jump error element (x[i] - x[j]) + h d_i in the input precision (for float
// input an error of the order of the rounding already in the stored points), sum it over blocks of
// 1024 elements in that precision and the blocks in double; dev needs only five double dot products
// per point.  Summation order is fixed: the result does not depend on threads (<= 0:
// std::thread::hardware_concurrency()).  Throws std::invalid_argument on bad sizes or sigmas.
void cost_matrix(const float* x, const float* den, const double* grid, int T, long B, long D, Metric metric,
                 double* out, int threads = 0);
void cost_matrix(const double* x, const double* den, const double* grid, int T, long B, long D, Metric metric,
                 double* out, int threads = 0);

}  // namespace gits
}  // namespace geosample
