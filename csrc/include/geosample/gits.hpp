// GITS dynamic programme over a fine grid of n points (indices 0 .. n-1).
//
//   V[i][1] = C[i][n-1],   V[j][k] = min_{j < m < n-1} C[j][m] + gamma V[m][k-1],
//
// with argmin back-pointers (ties: the smallest m). The path for `steps` steps starts at 0,
// follows the pointers and ends at n-1: steps + 1 strictly increasing indices.
#pragma once

#include <vector>

namespace geosample {
namespace gits {

// cost: row-major n x n (only C[j][m] with j < m is read). Requires n >= 2, 1 <= steps <= n-1,
// finite gamma > 0 and finite costs; throws std::invalid_argument otherwise.
std::vector<int> solve_dp(const double* cost, int n, int steps, double gamma);

// The paths for every step count 1 .. max_steps from one DP table (result[k - 1] has k + 1 indices).
std::vector<std::vector<int>> solve_dp_all(const double* cost, int n, int max_steps, double gamma);

}  // namespace gits
}  // namespace geosample
