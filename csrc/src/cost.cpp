// GITS cost matrix over float buffers: a blocked pair kernel for l1 / l2 and a moment kernel for dev.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "geosample/gits.hpp"

namespace geosample {
namespace gits {
namespace {

constexpr long kBlock = 256;  // D elements per block: the block's T points stay in L2, and each SIMD
                              // lane sums only kBlock / width terms in the input precision
constexpr long kGroup = 64;   // samples whose per-sample costs are kept before the ordered reduction

// ---- l1 / l2: every pair (i, j > i), one block of D at a time ------------------------------------

// For one sample and one block of K elements: sum[i * T + j] += sum_k |e_ijk|^p with
// e_ij = (x_i - x_j) + h_ij d_i (x_i - x_j first: exact for nearby points, and the error then
// scales with |x_i - x_j|, not |x_i|).  xr[t]: the block of point t; d: the block's directions [T-1][K].
// Four j at a time share the loads of x_i and d_i; the k loop is a SIMD reduction.
template <class S, bool Square>
inline void pair_block(const S* const* xr, const S* d, const S* h, int T, long K, double* sum) {
    for (int i = 0; i + 1 < T; ++i) {
        const S* xi = xr[i];
        const S* di = d + i * K;
        const S* hi = h + static_cast<long>(i) * T;
        for (int j = i + 1; j < T; j += 4) {
            const int j1 = std::min(j + 1, T - 1), j2 = std::min(j + 2, T - 1), j3 = std::min(j + 3, T - 1);
            const S *x0 = xr[j], *x1 = xr[j1], *x2 = xr[j2], *x3 = xr[j3];
            const S h0 = hi[j], h1 = hi[j1], h2 = hi[j2], h3 = hi[j3];
            S a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
            for (long k = 0; k < K; ++k) {
                const S e0 = (xi[k] - x0[k]) + h0 * di[k], e1 = (xi[k] - x1[k]) + h1 * di[k];
                const S e2 = (xi[k] - x2[k]) + h2 * di[k], e3 = (xi[k] - x3[k]) + h3 * di[k];
                a0 += Square ? e0 * e0 : std::abs(e0), a1 += Square ? e1 * e1 : std::abs(e1);
                a2 += Square ? e2 * e2 : std::abs(e2), a3 += Square ? e3 * e3 : std::abs(e3);
            }
            const S a[4] = {a0, a1, a2, a3};
            for (int q = 0; q < 4 && j + q < T; ++q) sum[i * T + j + q] += a[q];
        }
    }
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
template <class S, bool Square>
__attribute__((target("avx2,fma"))) void pair_block_avx2(const S* const* xr, const S* d, const S* h, int T, long K,
                                                          double* sum) {
    pair_block<S, Square>(xr, d, h, T, K, sum);
}
#endif

// The same kernel compiled for AVX2 + FMA where the CPU has them (chosen once, at run time).
template <class S, bool Square>
void pair_block_dispatch(const S* const* xr, const S* d, const S* h, int T, long K, double* sum) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2) return pair_block_avx2<S, Square>(xr, d, h, T, K, sum);
#endif
    pair_block<S, Square>(xr, d, h, T, K, sum);
}

template <class S>
struct PairScratch {
    std::vector<const S*> xr;
    std::vector<S> d;
    explicit PairScratch(int T) : xr(T), d(kBlock * T) {}
};

// One sample's costs: cost[i * T + j] = |e_ij|_1 or |e_ij|_2 (i < j).
template <class S>
void pair_sample(const S* x, const S* den, const double* grid, const S* h, int T, long B, long D, long b,
                 bool square, double* cost, PairScratch<S>& s) {
    std::fill(cost, cost + static_cast<long>(T) * T, 0.0);
    for (long k0 = 0; k0 < D; k0 += kBlock) {
        const long K = std::min(kBlock, D - k0);
        for (int t = 0; t < T; ++t) {
            s.xr[t] = x + (t * B + b) * D + k0;
            if (t + 1 == T) break;
            const S* dr = den + (t * B + b) * D + k0;
            for (long k = 0; k < K; ++k)
                s.d[t * K + k] = static_cast<S>((static_cast<double>(s.xr[t][k]) - dr[k]) / grid[t]);
        }
        if (square)
            pair_block_dispatch<S, true>(s.xr.data(), s.d.data(), h, T, K, cost);
        else
            pair_block_dispatch<S, false>(s.xr.data(), s.d.data(), h, T, K, cost);
    }
    if (square)
        for (long n = 0; n < static_cast<long>(T) * T; ++n) cost[n] = std::sqrt(cost[n]);
}

// ---- dev: five dot products per point -------------------------------------------------------------

inline double clamp0(double v) { return v < 0 ? 0.0 : v; }  // rounding below 0 -> 0; NaN stays NaN

// One sample's signed deviation costs.  With c = x[T-1] - x[0], r_t = x[T-1] - x[t] and d_t:
// |P r|^2 = r.r - (r.c)^2 / c.c, <P r, P d> = r.d - (r.c)(d.c) / c.c, |P d|^2 = d.d - (d.c)^2 / c.c,
// and |P (r_i - h d_i)|^2 = |P r_i|^2 - 2 h <P r_i, P d_i> + h^2 |P d_i|^2.
template <class S>
void dev_sample(const S* x, const S* den, const double* grid, int T, long B, long D, long b, double* cost,
                std::vector<double>& m) {
    const S* last = x + ((T - 1) * B + b) * D;
    const S* first = x + b * D;
    double cc = 0;
#pragma omp simd reduction(+ : cc)
    for (long k = 0; k < D; ++k) {
        const double c = static_cast<double>(last[k]) - first[k];
        cc += c * c;
    }
    for (int t = 0; t < T; ++t) {
        const bool has_d = t + 1 < T;  // the last point has no direction: d = 0 there
        const S* xr = x + (t * B + b) * D;
        const S* dr = has_d ? den + (t * B + b) * D : xr;
        const double inv = 1.0 / grid[t];
        double rr = 0, rc = 0, dd = 0, dc = 0, rd = 0;
#pragma omp simd reduction(+ : rr, rc, dd, dc, rd)
        for (long k = 0; k < D; ++k) {
            const double c = static_cast<double>(last[k]) - first[k];
            const double r = static_cast<double>(last[k]) - xr[k];
            const double d = has_d ? (static_cast<double>(xr[k]) - dr[k]) * inv : 0.0;
            rr += r * r, rc += r * c, dd += d * d, dc += d * c, rd += r * d;
        }
        m[5 * t + 0] = clamp0(rr - rc * rc / cc);  // |P r|^2
        m[5 * t + 1] = rd - rc * dc / cc;                 // <P r, P d>
        m[5 * t + 2] = clamp0(dd - dc * dc / cc);  // |P d|^2
    }
    for (int i = 0; i + 1 < T; ++i)
        for (int j = i + 1; j < T; ++j) {
            const double h = grid[j] - grid[i];
            const double student = m[5 * i] - 2 * h * m[5 * i + 1] + h * h * m[5 * i + 2];
            cost[i * T + j] = std::sqrt(clamp0(student)) - std::sqrt(m[5 * j]);
        }
}

// ---- driver -----------------------------------------------------------------------------------------

void check(const void* x, const void* den, const double* grid, int T, long B, long D, const double* out) {
    if (!x || !den || !grid || !out) throw std::invalid_argument("cost_matrix: null buffer");
    if (T < 2 || B < 1 || D < 1)
        throw std::invalid_argument("cost_matrix needs T >= 2 points, B >= 1 samples and D >= 1 elements, got T=" +
                                    std::to_string(T) + ", B=" + std::to_string(B) + ", D=" + std::to_string(D));
    for (int t = 0; t < T; ++t)
        if (!(std::isfinite(grid[t]) && grid[t] > 0))
            throw std::invalid_argument("cost_matrix: grid sigmas must be finite and > 0, got " +
                                        std::to_string(grid[t]) + " at " + std::to_string(t));
}

template <class S>
void cost_matrix_impl(const S* x, const S* den, const double* grid, int T, long B, long D, Metric metric,
                      double* out, int threads) {
    check(x, den, grid, T, B, D, out);
    const long TT = static_cast<long>(T) * T;
    std::vector<S> h(TT);  // h[i * T + j] = grid[j] - grid[i] in the input precision
    for (int i = 0; i < T; ++i)
        for (int j = 0; j < T; ++j) h[i * T + j] = static_cast<S>(grid[j] - grid[i]);
    const long group = std::min(kGroup, B);
    const int nt = static_cast<int>(std::clamp<long>(
        threads > 0 ? threads : static_cast<long>(std::max(1u, std::thread::hardware_concurrency())), 1, group));
    std::vector<double> per(group * TT), total(TT, 0.0);
    auto work = [&](int tid, long g0, long gn) {
        PairScratch<S> s(metric == Metric::dev ? 1 : T);
        std::vector<double> m(5 * T);
        for (long n = tid; n < gn; n += nt) {
            double* cost = per.data() + n * TT;
            if (metric == Metric::dev)
                dev_sample(x, den, grid, T, B, D, g0 + n, cost, m);
            else
                pair_sample(x, den, grid, h.data(), T, B, D, g0 + n, metric == Metric::l2, cost, s);
        }
    };
    for (long g0 = 0; g0 < B; g0 += group) {
        const long gn = std::min(group, B - g0);
        std::vector<std::thread> pool;
        for (int tid = 1; tid < nt; ++tid) pool.emplace_back(work, tid, g0, gn);
        work(0, g0, gn);
        for (auto& th : pool) th.join();
        for (long n = 0; n < gn; ++n)  // in sample order, whatever the thread count
            for (long e = 0; e < TT; ++e) total[e] += per[n * TT + e];
    }
    const double inf = std::numeric_limits<double>::infinity();
    for (int i = 0; i < T; ++i)
        for (int j = 0; j < T; ++j) out[i * T + j] = i < j ? total[i * T + j] / static_cast<double>(B) : inf;
}

}  // namespace

Metric metric_from_name(const std::string& name) {
    if (name == "l1") return Metric::l1;
    if (name == "l2") return Metric::l2;
    if (name == "dev") return Metric::dev;
    throw std::invalid_argument("unknown metric '" + name + "'; valid: l1, l2, dev");
}

void cost_matrix(const float* x, const float* den, const double* grid, int T, long B, long D, Metric metric,
                 double* out, int threads) {
    cost_matrix_impl(x, den, grid, T, B, D, metric, out, threads);
}

void cost_matrix(const double* x, const double* den, const double* grid, int T, long B, long D, Metric metric,
                 double* out, int threads) {
    cost_matrix_impl(x, den, grid, T, B, D, metric, out, threads);
}

}  // namespace gits
}  // namespace geosample
