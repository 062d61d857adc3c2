#include "geosample/gits.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace geosample {
namespace gits {
namespace {

void check(const double* cost, int n, int steps, double gamma) {
    if (cost == nullptr) throw std::invalid_argument("cost must not be null");
    if (n < 2) throw std::invalid_argument("cost must be at least 2 x 2, got n=" + std::to_string(n));
    if (steps < 1 || steps > n - 1)
        throw std::invalid_argument("steps must be in [1, " + std::to_string(n - 1) + "] for " + std::to_string(n) +
                                    " grid points, got " + std::to_string(steps));
    if (!std::isfinite(gamma) || gamma <= 0)
        throw std::invalid_argument("gamma must be a finite number > 0, got " + std::to_string(gamma));
    for (int j = 0; j < n; ++j)
        for (int m = j + 1; m < n; ++m)
            if (!std::isfinite(cost[j * n + m]))
                throw std::invalid_argument("cost must be finite, got a non-finite entry at (" + std::to_string(j) +
                                            ", " + std::to_string(m) + ")");
}

// The objective sum_k gamma^k C[i_k][i_{k+1}] is scale-invariant, so costs near the top of the
// double range (|C| >= 2^512, where V sums would overflow to inf and hide the argmin) are divided by
// a power of two (exact) that brings the largest |C| into [0.5, 1); smaller costs are used as given.
std::vector<double> rescaled(const double* cost, int n) {
    double peak = 0;
    for (int j = 0; j < n; ++j)
        for (int m = j + 1; m < n; ++m) peak = std::max(peak, std::fabs(cost[j * n + m]));
    if (peak < std::ldexp(1.0, 512)) return {};
    int exponent = 0;
    std::frexp(peak, &exponent);
    std::vector<double> out(cost, cost + static_cast<std::size_t>(n) * n);
    for (double& v : out) v = std::ldexp(v, -exponent);
    return out;
}

// Fills ptr[k] (k = 1..max_steps) with the argmin m of V[j][k]; ptr[1][j] = n - 1.
// V is kept for two levels only; infeasible states (fewer than k points left) stay at +inf.
std::vector<std::vector<int>> table(const double* cost, int n, int max_steps, double gamma) {
    const double inf = std::numeric_limits<double>::infinity();
    const int end = n - 1;
    std::vector<std::vector<int>> ptr(max_steps + 1, std::vector<int>(n, -1));
    std::vector<double> prev(n, inf), cur(n, inf);
    for (int j = 0; j < end; ++j) {
        prev[j] = cost[j * n + end];
        ptr[1][j] = end;
    }
    for (int k = 2; k <= max_steps; ++k) {
        std::fill(cur.begin(), cur.end(), inf);
        for (int j = 0; j + k <= end; ++j) {
            const double* row = cost + static_cast<std::size_t>(j) * n;
            double best = inf;
            int arg = -1;
            for (int m = j + 1; m + k - 1 <= end; ++m) {
                const double v = row[m] + gamma * prev[m];
                if (arg < 0 || v < best) {  // the first m even when every sum is +inf (huge gamma^k)
                    best = v;
                    arg = m;
                }
            }
            cur[j] = best;
            ptr[k][j] = arg;
        }
        std::swap(prev, cur);
    }
    return ptr;
}

std::vector<int> backtrack(const std::vector<std::vector<int>>& ptr, int steps) {
    std::vector<int> path{0};
    for (int k = steps; k >= 1; --k) path.push_back(ptr[k][path.back()]);
    return path;
}

}  // namespace

std::vector<int> solve_dp(const double* cost, int n, int steps, double gamma) {
    check(cost, n, steps, gamma);
    const auto scaled = rescaled(cost, n);
    return backtrack(table(scaled.empty() ? cost : scaled.data(), n, steps, gamma), steps);
}

std::vector<std::vector<int>> solve_dp_all(const double* cost, int n, int max_steps, double gamma) {
    check(cost, n, max_steps, gamma);
    const auto scaled = rescaled(cost, n);
    const auto ptr = table(scaled.empty() ? cost : scaled.data(), n, max_steps, gamma);
    std::vector<std::vector<int>> paths;
    for (int k = 1; k <= max_steps; ++k) paths.push_back(backtrack(ptr, k));
    return paths;
}

}  // namespace gits
}  // namespace geosample
